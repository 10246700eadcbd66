"""`python train.py recipe=NAME key=value ...`: the full pipeline of a recipe (see training/pipeline.py)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from drafters.errors import DraftsmithError


@hydra.main(version_base=None, config_path="recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from training.pipeline import run

    try:
        run(cfg)
    except DraftsmithError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except MissingMandatoryValue as err:  # a recipe's `???`, e.g. the ShareGPT file of the Vicuna recipes
        print(f"error: {err.full_key} has no value: give it on the command line ({err.full_key}=...)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
