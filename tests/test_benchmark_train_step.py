"""benchmarks/train_step.py (the GPU recipes' speed and memory check) runs a recipe's real training step."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from draftsmith.drafters.errors import DraftsmithError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_recipe_step_on_a_random_target_of_a_named_shape(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    script.main(["recipe=medusa_smollm2", "shape=tiny", "steps=3", "warmup=1", "trainer.max_length=32"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"rank 0: medusa_smollm2 \(medusa, [\d.]+ M trainable\) on a random tiny target \| strategy auto, precision "
        r"32, batch 8 x 32 tokens \| training [\d,]+ tokens/s over 2 timed batches = [\d.]+x the target's forward "
        r"alone \([\d,]+ tokens/s\) \| peak memory n/a \(CPU\)",
        line,
    ), line


def test_unknown_shape_and_too_few_steps_are_refused() -> None:
    script = load_script()
    with pytest.raises(DraftsmithError, match="shape='huge' is not known"):
        script.main(["shape=huge"])
    with pytest.raises(DraftsmithError, match="steps=3 must exceed warmup=3"):
        script.main(["steps=3"])
