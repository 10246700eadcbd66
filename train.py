"""`python train.py recipe=NAME key=value ...`: the full pipeline of a recipe (see training/pipeline.py)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from drafters.errors import one_line_errors


@hydra.main(version_base=None, config_path="recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from training.pipeline import run

    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    main()
