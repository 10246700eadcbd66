"""The trainer config group (`recipes/trainer/*.yaml`) as a typed, validated object."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from draftsmith.drafters.errors import DraftsmithError

STRATEGIES = ("auto", "ddp", "deepspeed")
FEATURE_MODES = ("online", "cache")


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs besides the target, the drafter and the data."""

    accelerator: str = "cpu"
    strategy: str = "auto"  # auto | ddp | deepspeed
    zero_stage: int | None = None  # 2 or 3 with strategy=deepspeed
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32"
    max_epochs: int = 1
    max_steps: int = -1  # -1 = until max_epochs
    batch_size: int = 8
    accumulate_grad_batches: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    val_fraction: float = 0.05
    max_length: int = 512
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    features: str = "online"  # online | cache
    sort_chunk: int = 64  # batches per chunk whose rows are sorted by length (length bucketing)
    num_workers: int = 0

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DraftsmithError(f"unknown trainer key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        settings = cls(**{k: v for k, v in values.items()})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DraftsmithError(f"trainer.strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.strategy == "deepspeed" and self.zero_stage not in (1, 2, 3):
            raise DraftsmithError("trainer.strategy=deepspeed needs trainer.zero_stage=1, 2 or 3")
        if self.features not in FEATURE_MODES:
            raise DraftsmithError(f"trainer.features={self.features!r}: use one of {', '.join(FEATURE_MODES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DraftsmithError(f"trainer.val_fraction={self.val_fraction}: give a fraction in [0, 1)")
        positive = (
            "devices",
            "num_nodes",
            "batch_size",
            "accumulate_grad_batches",
            "max_length",
            "max_epochs",
            "log_every_n_steps",
            "checkpoint_every_n_steps",
            "sort_chunk",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise DraftsmithError(f"trainer.{name}={getattr(self, name)}: must be at least 1")
        if self.lr <= 0:
            raise DraftsmithError(f"trainer.lr={self.lr}: must be positive")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise DraftsmithError("trainer.warmup_steps, weight_decay and num_workers must not be negative")
