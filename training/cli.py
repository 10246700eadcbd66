"""`draftsmith-train` / `python train.py recipe=NAME key=value ...`: the full pipeline of a recipe."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from draftsmith.drafters.errors import one_line_errors


@hydra.main(version_base=None, config_path="pkg://draftsmith.recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from draftsmith.training.pipeline import run

    with one_line_errors():
        run(cfg)
