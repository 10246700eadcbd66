"""`draftsmith-data` (`python -m data` in the repository): build, continue or reuse a recipe's distillation data."""

from __future__ import annotations

from omegaconf import DictConfig

from draftsmith.data.build import build_distilled
from draftsmith.data.store import read_manifest
from draftsmith.drafters.errors import hydra_cli, one_line_errors
from draftsmith.drafters.target import load_target
from draftsmith.training.settings import store_schemas

store_schemas()  # the recipes' schema (the same primary config as `python train.py`)


def run(cfg: DictConfig) -> None:
    target = load_target(cfg.target)
    folder = build_distilled(cfg.data, target)
    manifest = read_manifest(folder)
    print(
        f"rows {manifest['rows']}  tokens {manifest['tokens']}  target-written tokens {manifest['target_tokens']}  "
        f"folder {folder}"
    )
    unseen = cfg.data.unseen
    if unseen.out:
        print(f"unseen questions: {unseen.count} synthesized prompts the data leaves out -> {unseen.out}")


@hydra_cli(version_base=None, config_path="pkg://draftsmith.recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run(cfg)
