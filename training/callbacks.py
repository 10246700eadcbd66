"""AcceptanceEval: real speculative decoding with the target after every training epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target
from draftsmith.training.export import Exporter
from draftsmith.training.report import print_acceptance

KEEP_MODES = ("best", "last")


def check_keep(keep: str) -> str:
    if keep not in KEEP_MODES:
        raise DraftsmithError(f"eval.keep must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    return keep


class AcceptanceEval(L.Callback):
    """After each training epoch, rank 0 decodes the held-out questions with the drafter (greedy, lossless
    check included), logs tau / alpha_k / speedup, and rewrites the export: ``keep="best"`` when tau matches or
    beats the best so far, ``keep="last"`` every epoch (a few questions make tau noisy, and picking the maximum of
    noisy figures favours lucky epochs; with a decaying learning rate the last weights are the usual choice).
    With Medusa-2 the target is the adapted one: peft put the adapters inside the target model itself. The
    original target's greedy answers are decoded once (it never changes) and give the drift figures.

    ``every_epoch=False`` (ZeRO-3, whose sharded target cannot decode inside fit) leaves the epochs alone; the
    pipeline then calls ``measure`` once after training, as it does for a final export no epoch evaluated.

    Other processes wait at their next collective; global RNG states are left untouched, so evaluating
    does not change what training draws next (resumed runs stay identical to uninterrupted ones).
    """

    def __init__(
        self,
        target: Target,
        questions: list[Any],
        exporter: Exporter,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        out: str | Path | None = None,
        seed: int = 0,
        keep: str = "best",
        every_epoch: bool = True,
        tree_nodes: str | None = None,
    ) -> None:
        self.keep = check_keep(keep)
        self.every_epoch = every_epoch
        self.target = target
        self.questions = questions
        self.exporter = exporter
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.out = Path(out) if out is not None else None
        self.seed = seed
        # the final evaluation's draft size ("auto": per step, by the measured cost model); the per-epoch ones that
        # pick the kept epoch use the drafter's own tree, so every epoch is measured at one shape
        self.tree_nodes = tree_nodes
        self.kept_summary: dict[str, Any] | None = None
        self.kept_epoch_dir: Path | None = None
        self.kept_step: int | None = None  # the optimizer step of the exported weights
        self.original: list[Any] | None = None

    def _original_answers(self, pl_module: L.LightningModule) -> list[Any] | None:
        adapter = getattr(pl_module, "adapter", None)
        if adapter is None:
            return None
        if self.original is None:
            from draftsmith.eval.drift import greedy_turns

            with adapter.disable_adapter():
                self.original = greedy_turns(self.target, self.questions, self.max_new_tokens)
        return self.original

    def measure(
        self,
        pl_module: L.LightningModule,
        out: Path | None,
        *,
        target: Target | None = None,
        drafter: torch.nn.Module | None = None,
        own_tree: bool = False,
    ) -> dict[str, Any]:
        """Decode the questions with ``drafter`` (default: the module's) on ``target`` (default: this callback's)
        with this callback's settings (``own_tree``: at the drafter's own tree, whatever ``tree_nodes`` says), in
        eval mode, without touching the global RNG; a Medusa-2 module's summary carries the drift from the
        original target."""
        from draftsmith.eval.runner import evaluate

        target = self.target if target is None else target
        drafter = pl_module.drafter if drafter is None else drafter
        # the whole module: with its adapter dropout on, a Medusa-2 target would be random, and speculative and
        # plain decoding would disagree
        modes = [(module, module.training) for module in (pl_module, drafter)]
        pl_module.eval()
        drafter.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            summary = evaluate(
                target,
                drafter,
                self.questions,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                out=out,
                seed=self.seed,
                progress=True,
                original=self._original_answers(pl_module),
                tree_nodes=None if own_tree else self.tree_nodes,
            )
        for module, training in modes:
            module.train(training)
        return summary

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.every_epoch or not self.questions:
            return
        epoch = trainer.current_epoch
        epoch_dir = None if self.out is None else self.out / f"epoch{epoch}"
        summary = self.measure(pl_module, epoch_dir, own_tree=True)
        metrics = {"accept/tau": float(summary["tau"]), "accept/speedup": float(summary["speedup"])}
        for name, value in summary.get("adapter_drift", {}).items():
            if value is not None:
                metrics[f"drift/{name}"] = float(value)
        metrics.update({f"accept/alpha_{k}": float(a) for k, a in enumerate(summary["alpha"], start=1)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        print_acceptance(summary, f"acceptance after epoch {epoch}", Console(stderr=True))
        # a tie goes to the later epoch: the same measured tau after more training (a few questions tie often)
        if self.keep == "last" or self.kept_tau is None or summary["tau"] >= self.kept_tau:
            self.kept_summary = summary
            self.kept_epoch_dir = epoch_dir
            self.kept_step = int(trainer.global_step)
            self.exporter.write(pl_module.drafter, summary)

    @property
    def kept_tau(self) -> float | None:
        return None if self.kept_summary is None else float(self.kept_summary["tau"])

    def holds_final(self, final_step: int) -> bool:
        """Whether the export already holds what this run should keep, evaluated: the best epoch's, or with
        ``keep="last"`` the weights of ``final_step`` (a resumed run can end past its last evaluation)."""
        if self.kept_tau is None or self.kept_epoch_dir is None:
            return False
        return self.keep == "best" or self.kept_step == final_step

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept_summary": self.kept_summary,
            "kept_epoch_dir": None if self.kept_epoch_dir is None else str(self.kept_epoch_dir),
            "kept_step": self.kept_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # "best_*": the keys of checkpoints written before eval.keep existed (they kept the best tau)
        self.kept_summary = state_dict.get("kept_summary", state_dict.get("best_summary"))
        folder = state_dict.get("kept_epoch_dir", state_dict.get("best_epoch_dir"))
        self.kept_epoch_dir = None if folder is None else Path(folder)
        self.kept_step = state_dict.get("kept_step")
