"""Training phases: one run trained in stages, each some epochs long with its own drafter settings and learning
rate (DEER's stage 0, I and II; any drafter kind may use them).

``trainer.phases: [{name, epochs, lr, drafter: {KEY: VALUE}}]`` splits a run: ``trainer.max_epochs`` becomes the
sum of the phases' epochs. At the start of every epoch the module sets the drafter's config to the recipe's
drafter config with the overrides of the phase that epoch belongs to (keys a phase leaves out keep the recipe's
value; measured fields keep what training measured). Each phase restarts the warmup and cosine decay of the
learning rate over its own steps, at its own ``lr`` (null = trainer.lr). Validation, the per-epoch acceptance
evaluation and checkpoints stay per epoch; a resumed run re-enters the phase of the epoch it resumes in, and the
resume check lets the keys the phases set differ from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from draftsmith.drafters.base import DrafterConfig
from draftsmith.drafters.errors import DraftsmithError


@dataclass(frozen=True)
class Phase:
    name: str = ""
    epochs: int = 1
    lr: float | None = None  # null = trainer.lr
    drafter: dict[str, Any] = field(default_factory=dict)  # drafter config keys set for this phase

    @classmethod
    def from_config(cls, values: Any) -> Phase:
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DraftsmithError(
                f"unknown trainer.phases key(s) {', '.join(unknown)}; known: name, epochs, lr, drafter"
            )
        phase = cls(**{**values, "drafter": dict(values.get("drafter") or {})})
        if not phase.name or phase.epochs < 1 or (phase.lr is not None and phase.lr <= 0):
            raise DraftsmithError(
                f"trainer.phases entry {values}: each phase needs a name, epochs >= 1 and a positive lr (or null)"
            )
        return phase


def check_phases(phases: Sequence[Phase]) -> None:
    names = [phase.name for phase in phases]
    if len(set(names)) != len(names):
        raise DraftsmithError(f"trainer.phases names must differ: {', '.join(names)}")


def phase_at(phases: Sequence[Phase], epoch: int) -> int:
    """The index of the phase ``epoch`` (0-based) belongs to; epochs past the last phase stay in it."""
    end = 0
    for index, phase in enumerate(phases):
        end += phase.epochs
        if epoch < end:
            return index
    return len(phases) - 1


def overridden(phases: Sequence[Phase]) -> set[str]:
    """The drafter keys any phase sets."""
    return {key for phase in phases for key in phase.drafter}


def phase_config(base: DrafterConfig, current: DrafterConfig, phase: Phase, measured: Sequence[str]) -> DrafterConfig:
    """``base`` with ``phase``'s overrides and the measured fields of ``current``; a bad key or value is one line."""
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(phase.drafter) - known)
    if unknown:
        raise DraftsmithError(f"trainer.phases {phase.name}: the {base.kind} drafter has no key {', '.join(unknown)}")
    kept = {name: getattr(current, name) for name in measured}
    try:
        return dataclasses.replace(base, **{**kept, **phase.drafter})
    except (TypeError, ValueError) as err:
        raise DraftsmithError(f"trainer.phases {phase.name}: {err}") from None


def announce(phases: Sequence[Phase], index: int, epoch: int) -> None:
    phase = phases[index]
    first = sum(p.epochs for p in phases[:index])
    settings = ", ".join(f"{k}={v}" for k, v in phase.drafter.items()) or "the recipe's drafter"
    print(
        f"phase {index + 1}/{len(phases)} {phase.name}: epochs {first}-{first + phase.epochs - 1} "
        f"(now {epoch}), {settings}",
        file=sys.stderr,
    )


def _piecewise(step: int, bounds: Sequence[tuple[int, float, Callable[[int], float]]]) -> float:
    start, scale, factor = next((b for b in reversed(bounds) if step >= b[0]), bounds[0])
    return scale * factor(step - start)


def phase_schedule(
    optimizer: torch.optim.Optimizer, phases: Sequence[Phase], steps_per_epoch: int, warmup: int, lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine decay within each phase, scaled to the phase's lr (see the module docstring)."""
    bounds, start = [], 0
    for phase in phases:
        steps = max(steps_per_epoch * phase.epochs, 1)
        factor = get_cosine_schedule_with_warmup(optimizer, min(warmup, steps), steps).lr_lambdas[0]
        bounds.append((start, (phase.lr or lr) / lr, factor))
        start += steps
    # built last, so the optimizer starts at this schedule's first factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_piecewise, bounds=bounds))
