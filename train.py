"""`python train.py recipe=NAME key=value ...`: the full pipeline of a recipe (see training/pipeline.py)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from drafters.errors import DraftsmithError


@hydra.main(version_base=None, config_path="recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from training.pipeline import run

    try:
        run(cfg)
    except DraftsmithError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
