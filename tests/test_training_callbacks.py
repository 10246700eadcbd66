"""AcceptanceEval: evaluates after each epoch, logs, and keeps the export of the best tau or the last epoch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_training_support import tiny_drafter, tiny_target
from torch import nn

import draftsmith.eval.runner
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.callbacks import AcceptanceEval
from draftsmith.training.export import Exporter


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append(metrics)


def _summary(tau: float) -> dict:
    return {
        "tau": tau,
        "alpha": [tau - 1.0],
        "speedup": 1.0,
        "lossless_mismatches": 0,
        "by_category": {},
        "n_questions": 1,
    }


@pytest.fixture()
def scripted_taus(monkeypatch):
    taus = [1.5, 1.2, 1.8]
    calls = []

    def fake_evaluate(target, drafter, questions, **kwargs):
        calls.append(kwargs)
        return _summary(taus[len(calls) - 1])

    monkeypatch.setattr(draftsmith.eval.runner, "evaluate", fake_evaluate)
    return calls


def test_keeps_the_best_export_and_resumes_its_record(tmp_path, scripted_taus):
    target = tiny_target()
    drafter = tiny_drafter(target)
    callback = AcceptanceEval(
        target, ["q"], Exporter(tmp_path / "export", target.identity, {}), max_new_tokens=4, out=tmp_path / "epochs"
    )
    logger = RecordingLogger()
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, global_step=0, loggers=[logger])
    module = nn.ModuleDict({"drafter": drafter})
    exported_tau = []
    for epoch in range(3):
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, module)
        exported_tau.append(json.loads((tmp_path / "export" / "eval" / "summary.json").read_text())["tau"])
    assert exported_tau == [1.5, 1.5, 1.8]  # epoch 1 was worse: its drafter was not exported
    assert callback.kept_epoch_dir == tmp_path / "epochs" / "epoch2"
    assert [m["accept/tau"] for m in logger.logged] == [1.5, 1.2, 1.8] and "accept/alpha_1" in logger.logged[0]
    assert scripted_taus[0]["max_new_tokens"] == 4 and drafter.training

    restored = AcceptanceEval(target, ["q"], callback.exporter, max_new_tokens=4)
    restored.load_state_dict(callback.state_dict())
    assert (restored.kept_tau, restored.kept_epoch_dir) == (1.8, callback.kept_epoch_dir)

    legacy = AcceptanceEval(target, ["q"], callback.exporter, max_new_tokens=4)  # a checkpoint from before eval.keep
    old = callback.state_dict()
    legacy.load_state_dict({"best_summary": old["kept_summary"], "best_epoch_dir": old["kept_epoch_dir"]})
    assert (legacy.kept_tau, legacy.kept_epoch_dir, legacy.kept_step) == (1.8, callback.kept_epoch_dir, None)


def _run_epochs(callback: AcceptanceEval, drafter: nn.Module, tmp_path, epochs: int) -> list[float]:
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, global_step=0, loggers=[])
    exported_tau = []
    for epoch in range(epochs):
        trainer.current_epoch, trainer.global_step = epoch, 10 * (epoch + 1)
        callback.on_train_epoch_end(trainer, nn.ModuleDict({"drafter": drafter}))
        exported_tau.append(json.loads((tmp_path / "export" / "eval" / "summary.json").read_text())["tau"])
    return exported_tau


def test_keep_last_exports_every_epoch_and_knows_when_the_export_is_final(tmp_path, scripted_taus):
    target = tiny_target()
    callback = AcceptanceEval(
        target,
        ["q"],
        Exporter(tmp_path / "export", target.identity, {}),
        max_new_tokens=4,
        out=tmp_path / "epochs",
        keep="last",
    )
    assert _run_epochs(callback, tiny_drafter(target), tmp_path, 3) == [1.5, 1.2, 1.8]
    assert (callback.kept_step, callback.kept_epoch_dir) == (30, tmp_path / "epochs" / "epoch2")
    assert callback.holds_final(30)
    # a run resumed past its last evaluation (or a finished run re-exported with keep=last) must evaluate again
    assert not callback.holds_final(40)


def test_keep_best_holds_the_best_epoch_whatever_the_final_step(tmp_path, scripted_taus):
    target = tiny_target()
    callback = AcceptanceEval(
        target, ["q"], Exporter(tmp_path / "export", target.identity, {}), max_new_tokens=4, out=tmp_path / "epochs"
    )
    assert not callback.holds_final(0)
    assert _run_epochs(callback, tiny_drafter(target), tmp_path, 2) == [1.5, 1.5]
    assert callback.kept_step == 10 and callback.holds_final(20)


def test_keep_best_breaks_a_tie_for_the_later_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(draftsmith.eval.runner, "evaluate", lambda *args, **kwargs: _summary(1.5))
    target = tiny_target()
    callback = AcceptanceEval(
        target, ["q"], Exporter(tmp_path / "export", target.identity, {}), max_new_tokens=4, out=tmp_path / "epochs"
    )
    assert _run_epochs(callback, tiny_drafter(target), tmp_path, 2) == [1.5, 1.5]
    assert callback.kept_step == 20 and callback.kept_epoch_dir == tmp_path / "epochs" / "epoch1"


def test_an_unknown_keep_mode_is_one_clear_error(tmp_path):
    target = tiny_target()
    with pytest.raises(DraftsmithError, match="eval.keep must be one of best, last"):
        AcceptanceEval(target, [], Exporter(tmp_path, target.identity, {}), max_new_tokens=4, keep="newest")


def test_only_rank_zero_evaluates(tmp_path, scripted_taus):
    target = tiny_target()
    callback = AcceptanceEval(target, ["q"], Exporter(tmp_path / "export", target.identity, {}), max_new_tokens=4)
    trainer = SimpleNamespace(is_global_zero=False, current_epoch=0, global_step=0, loggers=[])
    callback.on_train_epoch_end(trainer, nn.ModuleDict({"drafter": tiny_drafter(target)}))
    assert scripted_taus == [] and not (tmp_path / "export").exists()


def test_epochs_compare_at_the_drafters_own_tree_and_the_final_evaluation_is_auto(tmp_path, scripted_taus):
    target = tiny_target()
    callback = AcceptanceEval(
        target, ["q"], Exporter(tmp_path / "export", target.identity, {}), max_new_tokens=4, tree_nodes="auto"
    )
    drafter = tiny_drafter(target)
    _run_epochs(callback, drafter, tmp_path, 2)
    callback.measure(nn.ModuleDict({"drafter": drafter}), None)
    assert [call["tree_nodes"] for call in scripted_taus] == [None, None, "auto"]
