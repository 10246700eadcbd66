"""`draftsmith-train` / `python train.py recipe=NAME key=value ...`: the full pipeline of a recipe."""

from __future__ import annotations

from omegaconf import DictConfig

from draftsmith.drafters.errors import hydra_cli, one_line_errors
from draftsmith.training.settings import store_schemas

store_schemas()


@hydra_cli(version_base=None, config_path="pkg://draftsmith.recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from draftsmith.training.pipeline import run

    with one_line_errors():
        run(cfg)
