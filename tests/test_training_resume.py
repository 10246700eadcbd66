"""A run killed mid-epoch and resumed from last.ckpt ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_training_support import settings, tiny_fit

# dropout makes the comparison depend on the restored RNG too, not only on weights, optimizer and data order
DRAFTER = {"dropout": 0.1}
KIND = "amphista"


class Killed(Exception):
    pass


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    train = settings(max_epochs=2, checkpoint_every_n_steps=3)
    reference = tiny_fit(tmp_path / "full", train, kind=KIND, drafter_fields=DRAFTER)
    steps = reference.trainer.global_step
    assert steps == 10  # 19 training rows in batches of 4: 5 steps per epoch

    with pytest.raises(Killed):
        tiny_fit(tmp_path / "killed", train, kind=KIND, drafter_fields=DRAFTER, callbacks=[KillAtStep(7)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 6 and saved["epoch"] == 1  # mid-epoch: step 6 is batch 1 of epoch 1

    resumed = tiny_fit(tmp_path / "killed", train, kind=KIND, drafter_fields=DRAFTER, ckpt_path=last)
    assert resumed.trainer.global_step == steps
    expected, got = reference.drafter.state_dict(), resumed.drafter.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.drafter.config.tree == reference.drafter.config.tree


def test_resume_refuses_another_drafter(tmp_path):
    from draftsmith.drafters.errors import DraftsmithError

    train = settings(max_epochs=1, checkpoint_every_n_steps=3)
    tiny_fit(tmp_path, train)
    with pytest.raises(DraftsmithError, match="other drafter settings"):
        tiny_fit(
            tmp_path,
            settings(max_epochs=2),
            drafter_fields={"num_layers": 2},
            ckpt_path=tmp_path / "checkpoints" / "last.ckpt",
        )


def test_resume_accepts_a_checkpoint_written_before_a_field_existed(tmp_path):
    train = settings(max_epochs=1, checkpoint_every_n_steps=3)
    tiny_fit(tmp_path, train)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    del saved["drafter_config"]["heads_warmup_steps"]  # as written before Medusa-2's heads warmup existed
    torch.save(saved, last)
    resumed = tiny_fit(tmp_path, settings(max_epochs=2), ckpt_path=last)
    assert resumed.trainer.current_epoch == 2
