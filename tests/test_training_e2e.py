"""`python train.py` end to end in a subprocess, on the real embedded target with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draftsmith.drafters.base import Drafter

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Name three primary colours.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a prime number is.",
    "Give me a tip for sleeping better.",
    "What is 12 times 7?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
]
TINY = [
    "data.limit=8",
    "data.max_new_tokens=16",
    "trainer.max_epochs=1",
    "trainer.batch_size=4",
    "trainer.val_fraction=0.25",
    "trainer.max_length=64",
    "trainer.log_every_n_steps=1",
    "eval.limit=1",
    "eval.max_new_tokens=4",
    "eval.tree_nodes=null",  # the drafter's own tree: auto would profile the real target first (minutes on a CPU)
]


def _train(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_train_py_end_to_end(tmp_path, real_target):
    # a prompt file instead of the recipe's synthesized prompts: synthesis is the data package's (slow) part
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    done = _train(f"out={tmp_path / 'run'}", f"data.out={tmp_path / 'data'}", f"data.prompts={prompts}", *TINY)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    assert "acceptance of" in done.stdout and "lossless mismatches" in done.stdout
    for name in ("config.json", "model.safetensors", "README.md", "recipe.yaml", "eval/summary.json"):
        assert (run / "export" / name).is_file(), name
    assert (run / "eval" / "summary.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    drafter = Drafter.from_pretrained(
        run / "export", target=real_target.model, tokenizer_hash=real_target.identity.tokenizer_hash
    )
    assert drafter.config.kind == "amphista" and drafter.config.tree is not None  # tree measured on validation

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/tau_est",
        "train/acc_top1/pos1",
        "train/acc_top10/pos4",
        "val/tau_est",
        "val/acc_top1/pos1",
        "accept/tau",
        "accept/alpha_1",
        "accept/speedup",
        "lr-AdamW/pg1",
    }
    assert expected <= tags, expected - tags


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.strategy=bogus", "error: trainer.strategy='bogus'"), ("eval.keep=newest", "error: eval.keep must be")],
)
def test_user_mistakes_end_in_one_error_line_and_exit_2(tmp_path, override, message):
    done = _train(f"out={tmp_path}", override, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in done.stderr


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    from draftsmith.drafters.errors import DraftsmithError
    from draftsmith.training.pipeline import resume_checkpoint

    assert resume_checkpoint(tmp_path, resume=False) is None
    with pytest.raises(DraftsmithError, match="resume=true but .*last.ckpt does not exist"):
        resume_checkpoint(tmp_path, resume=True)
