"""trainer.phases (training/phases.py): one run in stages, each with its drafter settings and its own schedule, and
a run killed at a stage boundary (or inside a later stage) resumes to the same weights; DEER's stages on a tiny
model."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_training_resume import KillAtStep, Killed
from test_training_support import make_trainer, settings, tiny_rows, tiny_target

from draftsmith.drafters.deer import DeerConfig, DeerDrafter
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.module import DrafterModule, frozen_target_expected
from draftsmith.training.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = [
    {"name": "adapt", "epochs": 1, "drafter": {"stage": "adapt", "mask_rate_min": 0.5}},
    {"name": "continue", "epochs": 1, "lr": 1e-3},
    {"name": "scribe", "epochs": 1, "drafter": {"stage": "scribe", "scribe_max": 3}},
]


class Record(L.Callback):
    """The drafter settings and the learning rate each training batch ran with."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, float, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        c = pl_module.drafter.config
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((trainer.current_epoch, c.stage, c.mask_rate_min, c.scribe_max, lr))


def deer_fit(out, train: TrainSettings, callbacks=(), ckpt_path=None) -> DrafterModule:
    L.seed_everything(0)
    target = tiny_target()
    drafter = DeerDrafter(DeerConfig(num_layers=1, block_size=4, cuts=2, anneal_steps=4))
    drafter.bind(target.model)
    drafter.init_weights("target", target.model)
    rows = DistillDataModule(tiny_rows(), batch_size=4, val_fraction=0.2, max_length=64, pad_id=0, sort_chunk=2)
    module = DrafterModule(drafter, target.model, train)
    with frozen_target_expected():
        make_trainer(out, train, list(callbacks)).fit(module, datamodule=rows, ckpt_path=ckpt_path)
    return module


def test_each_phase_sets_its_drafter_settings_and_restarts_the_schedule(tmp_path, capsys):
    train = settings(phases=STAGES, max_epochs=1, warmup_steps=2, lr=3e-3)
    assert train.max_epochs == 3  # the phases' sum, whatever max_epochs said
    record = Record()
    module = deer_fit(tmp_path, train, [record])
    assert module.trainer.global_step == 15  # 19 training rows in batches of 4: 5 steps per epoch
    by_epoch = {epoch: {seen[1:4] for seen in record.seen if seen[0] == epoch} for epoch in range(3)}
    assert by_epoch == {0: {("adapt", 0.5, 96)}, 1: {("continue", 1.0, 96)}, 2: {("scribe", 1.0, 3)}}
    lrs = [lr for *_, lr in record.seen]
    # warmup from 0 over 2 steps, then cosine decay, restarted in each phase at that phase's lr
    assert lrs[0] == lrs[5] == lrs[10] == 0.0
    assert lrs[1] == pytest.approx(1.5e-3) and lrs[6] == pytest.approx(5e-4) and lrs[11] == pytest.approx(1.5e-3)
    assert lrs[4] < lrs[3] < lrs[2]
    assert int(module.drafter.adapt_batches) == 5  # stage 0's anneal counted its own batches only
    err = capsys.readouterr().err
    assert (
        "phase 1/3 adapt: epochs 0-0" in err and "phase 2/3 continue" in err and "phase 3/3 scribe: epochs 2-2" in err
    )


@pytest.mark.parametrize(
    ("every", "kill_at", "saved_step"),
    [(100, 6, 5), (3, 8, 6)],
    ids=["at the stage boundary", "inside the next stage"],
)
def test_a_killed_run_resumes_across_a_stage_boundary_to_the_same_weights(tmp_path, every, kill_at, saved_step):
    train = settings(phases=STAGES[:1] + STAGES[2:], checkpoint_every_n_steps=every)
    full = deer_fit(tmp_path / "full", train)
    with pytest.raises(Killed):
        deer_fit(tmp_path / "killed", train, [KillAtStep(kill_at)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == saved_step
    record = Record()
    resumed = deer_fit(tmp_path / "killed", train, [record], ckpt_path=last)
    assert {stage for _, stage, *_ in record.seen} == {"scribe"}  # it went on in the stage it was killed in
    assert resumed.trainer.global_step == full.trainer.global_step == 10
    expected = full.drafter.state_dict()
    for name, value in resumed.drafter.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_bad_phases_are_one_line(tmp_path):
    with pytest.raises(DraftsmithError, match="unknown trainer.phases key.*epoch"):
        settings(phases=[{"name": "a", "epoch": 1}])
    with pytest.raises(DraftsmithError, match="names must differ: a, a"):
        settings(phases=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(DraftsmithError, match="each phase needs a name, epochs >= 1"):
        settings(phases=[{"name": "a", "epochs": 0}])
    with pytest.raises(DraftsmithError, match="phases b: the deer drafter has no key scribe_alpah"):
        deer_fit(tmp_path, settings(phases=[{"name": "b", "drafter": {"scribe_alpah": 1.05}}]))
    with pytest.raises(DraftsmithError, match="stage='denoise'"):  # checked before training starts
        deer_fit(tmp_path, settings(phases=[{"name": "c", "drafter": {"stage": "denoise"}}]))
