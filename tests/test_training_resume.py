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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; loader workers change nothing in it (the batch order is drawn in the main process)."""
    module = tiny_fit(tmp_path_factory.mktemp("full"), settings(max_epochs=2), kind=KIND, drafter_fields=DRAFTER)
    assert module.trainer.global_step == 10  # 19 training rows in batches of 4: 5 steps per epoch
    return module


def killed_and_resumed(out, train, kill_at: int, checkpoint_step: int, checkpoint_epoch: int):
    with pytest.raises(Killed):
        tiny_fit(out, train, kind=KIND, drafter_fields=DRAFTER, callbacks=[KillAtStep(kill_at)])
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert (saved["global_step"], saved["epoch"]) == (checkpoint_step, checkpoint_epoch)
    return tiny_fit(out, train, kind=KIND, drafter_fields=DRAFTER, ckpt_path=last)


def assert_same_run(resumed, reference):
    assert resumed.trainer.global_step == reference.trainer.global_step
    expected, got = reference.drafter.state_dict(), resumed.drafter.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.drafter.config.tree == reference.drafter.config.tree


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, reference):
    train = settings(max_epochs=2, checkpoint_every_n_steps=3)
    # mid-epoch: step 6 is batch 1 of epoch 1
    assert_same_run(killed_and_resumed(tmp_path, train, 7, checkpoint_step=6, checkpoint_epoch=1), reference)


def test_resume_from_an_epoch_end_with_loader_workers(tmp_path, reference):
    # workers fetch as soon as the loader is iterated, before a resumed trainer moves on to the next epoch
    train = settings(max_epochs=2, checkpoint_every_n_steps=100, num_workers=2)
    assert_same_run(killed_and_resumed(tmp_path, train, 7, checkpoint_step=5, checkpoint_epoch=0), reference)


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


def test_a_mid_epoch_checkpoint_of_the_old_loader_is_refused_in_one_line(tmp_path):
    from draftsmith.drafters.errors import DraftsmithError

    with pytest.raises(Killed):
        tiny_fit(tmp_path, settings(max_epochs=1, checkpoint_every_n_steps=3), callbacks=[KillAtStep(4)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"epoch": 0, "batches_done": 3}]
    torch.save(saved, last)
    with pytest.raises(DraftsmithError, match="epoch-end.ckpt"):
        tiny_fit(tmp_path, settings(max_epochs=1), ckpt_path=last)


@pytest.mark.parametrize("kind", ["eagle3", "parallelspec"])
def test_feature_drafters_resume_to_the_same_weights(tmp_path, kind):
    train = settings(max_epochs=2, checkpoint_every_n_steps=3)
    full = tiny_fit(tmp_path / "full", train, kind=kind)
    with pytest.raises(Killed):
        tiny_fit(tmp_path / "killed", train, kind=kind, callbacks=[KillAtStep(7)])
    resumed = tiny_fit(
        tmp_path / "killed", train, kind=kind, ckpt_path=tmp_path / "killed" / "checkpoints" / "last.ckpt"
    )
    assert resumed.trainer.global_step == full.trainer.global_step
    for name, value in full.drafter.state_dict().items():
        torch.testing.assert_close(resumed.drafter.state_dict()[name], value, rtol=0, atol=0, msg=name)
