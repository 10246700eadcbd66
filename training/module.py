"""DrafterModule: trains a Drafter against a frozen target inside Lightning."""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from draftsmith.drafters.base import Drafter, LossOutput
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.eval.metrics import chain_tau
from draftsmith.training import lora, phases
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.features import FeatureSource, OnlineFeatures
from draftsmith.training.rng import capture_rng, restore_rng
from draftsmith.training.settings import TrainSettings

TARGET_PREFIX = "target."


def delayed(factor: Callable[[int], float], step: int, *, start: int) -> float:
    """``factor`` shifted to begin at step ``start``, 0 before it."""
    return 0.0 if step < start else factor(step - start)


@contextlib.contextmanager
def frozen_target_expected() -> Iterator[None]:
    """Around ``trainer.fit`` of a DrafterModule: Lightning warns about modules in eval mode at the start of
    training, and the frozen target is in eval mode on purpose (no dropout in the features the drafter learns from)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning)
        yield


class DrafterModule(L.LightningModule):
    """Holds the frozen target (a submodule, so strategies place and shard it, but never optimised or
    checkpointed) and the trainable drafter.

    Medusa-2 (a drafter config with ``adapts_target``): the target gets LoRA adapters (`training.lora`), trained
    with the drafter and kept in checkpoints; its base weights stay frozen and out of checkpoints, and the loss
    adds ``distill_weight`` times the self-distillation KL to the original target.

    Validation sums the drafter's `LossOutput` counts over the whole held-out split (across processes too),
    logs exact per-position accuracies and hands the measured per-rank accuracies to ``drafter.calibrate``.
    """

    def __init__(
        self,
        drafter: Drafter,
        target: nn.Module,
        settings: TrainSettings,
        features: FeatureSource | None = None,
    ) -> None:
        super().__init__()
        if not drafter.trainable:
            raise DraftsmithError(f"drafter kind {drafter.config.kind!r} has no trainable parameters: pick another")
        self.target = target.eval().requires_grad_(False)
        self.drafter = drafter
        self.settings = settings
        self.features = features or OnlineFeatures()
        self.needs = drafter.target_needs()
        self.adapted = lora.adapts_target(drafter.config)
        if self.adapted:
            lora.check_online(drafter.config, isinstance(self.features, OnlineFeatures))
            self.target = lora.attach_lora(self.target, drafter.config)
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_step_end: float | None = None
        self._val_sums: dict[str, torch.Tensor] = {}
        # the recipe's drafter config, which each phase's overrides start from (training/phases.py)
        self.base_config = drafter.config
        self.phase: int | None = None
        for phase in settings.phases:  # a bad key or value of any phase ends the run now, not epochs later
            phases.phase_config(drafter.config, drafter.config, phase, drafter.measured_fields)

    def train(self, mode: bool = True) -> DrafterModule:
        super().train(mode)
        self.target.eval()  # Lightning flips the whole module to train mode; the target stays frozen
        lora.set_dropout_mode(self.target, mode)  # but Medusa-2's adapters train
        return self

    @property
    def adapter(self) -> nn.Module | None:
        """The peft model whose adapters an export must carry (Medusa-2), else None."""
        return self.target if self.adapted else None

    def _step(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        features = self.features(self.target, batch, self.needs)
        out = self.drafter.loss(batch, features)
        if self.adapted:
            kl = lora.self_distillation_kl(self.target, batch, features["hidden"][-1])
            out.logs["kl"] = kl.detach()
            out.loss = out.loss + self.drafter.config.distill_weight * kl
        return out

    # -- training ----------------------------------------------------------------------------

    def _enter_phase(self) -> None:
        """Give the drafter the settings of the phase the current epoch belongs to (training/phases.py)."""
        plan = self.settings.phases
        if not plan:
            return
        index = phases.phase_at(plan, self.current_epoch)
        config = phases.phase_config(self.base_config, self.drafter.config, plan[index], self.drafter.measured_fields)
        self.drafter.config = config
        if index != self.phase and self.trainer.is_global_zero:
            phases.announce(plan, index, self.current_epoch)
            for logger in self.trainer.loggers:
                logger.log_metrics({"phase": index}, step=self.global_step)
        self.phase = index

    def on_train_start(self) -> None:
        self._enter_phase()  # a resumed run starts inside its phase

    def on_train_epoch_start(self) -> None:
        self._enter_phase()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        acc = out.top1().detach().float()
        self.log("train/loss", out.loss.detach(), prog_bar=True)
        self.log("train/tau_est", chain_tau(acc.tolist()), prog_bar=True)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value)
        for k, value in enumerate(acc.tolist(), start=1):
            self.log(f"train/acc_top1/pos{k}", value)
        if out.hits.shape[-1] > 1:
            topk = torch.tensor(out.rank_accuracy()).sum(-1)
            for k, value in enumerate(topk.tolist(), start=1):
                self.log(f"train/acc_top{out.hits.shape[-1]}/pos{k}", value)
        now = time.perf_counter()
        if self._last_step_end is not None:
            tokens = float(batch["attention_mask"].sum()) * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_end, 1e-9), prog_bar=True)
        self._last_step_end = now
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.drafter.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
                *lora.lora_param_groups(self.target, self.drafter.config, self.settings.weight_decay),
            ],
            lr=self.settings.lr,
        )
        total = self._total_steps()
        warmup = min(self.settings.warmup_steps, total)
        start = lora.adapter_start_step(self.drafter.config) if self.adapted else 0
        if self.settings.phases:
            if start:
                raise DraftsmithError("trainer.phases restart the schedule per phase: set heads_warmup_steps=0")
            per_epoch = self._total_steps(per_epoch=True)
            schedule = phases.phase_schedule(optimizer, self.settings.phases, per_epoch, warmup, self.settings.lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        if start >= total:
            raise DraftsmithError(
                f"drafter.heads_warmup_steps={start} covers the whole run ({total} optimizer steps), so the "
                "adapters would never train: lower it or train longer"
            )
        schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        if start:  # the LoRA group is the last one: it waits for the heads, then runs its own warmup and decay
            own = get_cosine_schedule_with_warmup(optimizer, warmup, total - start).lr_lambdas[-1]
            # hand-written shift: transformers' schedules all begin at step 0
            factors = [*schedule.lr_lambdas[:-1], functools.partial(delayed, own, start=start)]
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _total_steps(self, per_epoch: bool = False) -> int:
        """Optimizer steps of the whole run (or of one epoch), for the cosine schedule.

        Not ``trainer.estimated_stepping_batches`` with our datamodule: asking it builds and caches the train
        loader before a resumed run restores its state, so the loader would never learn where to resume.
        """
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, DistillDataModule):
            divide = self.settings.max_epochs if per_epoch else 1
            return max(int(self.trainer.estimated_stepping_batches) // divide, 1)
        steps = math.ceil(datamodule.train_batches_per_epoch() / self.settings.accumulate_grad_batches)
        if per_epoch:
            return max(steps, 1)
        total = steps * self.settings.max_epochs
        if self.settings.max_steps > 0:
            total = min(total, self.settings.max_steps)
        return max(total, 1)

    # -- validation --------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        weight = out.counts.detach().double()[0]
        sums = {
            "hits": out.hits.detach().double(),
            "n": out.counts.detach().double(),
            "loss": out.loss.detach().double() * weight,
            "loss_weight": weight,
        }
        for key, value in sums.items():
            self._val_sums[key] = self._val_sums.get(key, 0) + value

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:  # no validation batches (e.g. a sanity check of zero steps)
            return
        totals = {
            k: self.trainer.strategy.reduce(torch.as_tensor(v, device=self.device), reduce_op="sum")
            for k, v in self._val_sums.items()
        }
        if float(totals["n"][0]) == 0:
            return
        measured = LossOutput(loss=totals["loss"], hits=totals["hits"], counts=totals["n"])
        per_rank = torch.tensor(measured.rank_accuracy(), dtype=torch.float64)
        top1, topk = per_rank[:, 0], per_rank.sum(-1)
        # every process holds the same totals already; sync_dist only averages equal values (and keeps
        # Lightning from warning about unsynchronised epoch metrics)
        metrics = {"val/loss": float(totals["loss"] / totals["loss_weight"])}
        for k in range(len(top1)):
            metrics[f"val/acc_top1/pos{k + 1}"] = float(top1[k])
            metrics[f"val/acc_top{per_rank.shape[1]}/pos{k + 1}"] = float(topk[k])
        self.log_dict(metrics, sync_dist=True)
        self.log("val/tau_est", chain_tau(top1.tolist()), prog_bar=True, sync_dist=True)
        self.val_rank_accuracy = per_rank.float().cpu()
        if not self.trainer.sanity_checking:
            self.drafter.calibrate(per_rank.tolist())

    # -- checkpoints: drafter (and target adapters) only, plus what an exact resume needs ------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        adapters = {TARGET_PREFIX + name for name, param in self.target.named_parameters() if param.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(TARGET_PREFIX) or k in adapters
        }
        checkpoint["drafter_config"] = self.drafter.config.to_dict()
        checkpoint["rng"] = capture_rng()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if any(set(state) == {"epoch", "batches_done"} for state in loop.get("combined_loader", [])):
            raise DraftsmithError(
                "this mid-epoch checkpoint keeps its data position in the form draftsmith used before torchdata's "
                "StatefulDataLoader: resume from checkpoints/epoch-end.ckpt (link last.ckpt to it) or run anew"
            )
        saved = dict(checkpoint.get("drafter_config") or {})
        current = self.drafter.config.to_dict()
        # a field added since the checkpoint was written counts as its default, which keeps the old behaviour
        defaults = type(self.drafter.config)().to_dict()
        # measured fields change during training, and phases set theirs; every other field must match
        measured = self.drafter.measured_fields
        varying = set(measured) | phases.overridden(self.settings.phases)
        differing = sorted(
            k for k in set(saved) | set(current) if k not in varying and saved.get(k, defaults.get(k)) != current.get(k)
        )
        if saved and differing:
            raise DraftsmithError(
                f"the checkpoint to resume has other drafter settings ({', '.join(differing)}): "
                "set resume=false or use a new out= folder"
            )
        self.drafter.restore_measured({k: saved[k] for k in measured if k in saved})
        # the frozen target was left out on save; hand back its live weights so strict loading still checks the rest
        for key, value in self.target.state_dict().items():
            checkpoint["state_dict"].setdefault(TARGET_PREFIX + key, value)
        self._rng_to_restore = checkpoint.get("rng")
