"""Drafting cost on the real target's sizes (hidden 576, vocab 49152), measured interleaved in one run.

Amphista keeps an incremental KV cache for its causal adaptation layers; the baseline recomputes them over
the whole prefix at every step. Each round times: one Medusa step, one incremental Amphista step, one
Amphista step from scratch.
Run with ``-s`` to see the figures; on a shared, loaded CPU they are only indicative.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

from drafters.amphista import AmphistaConfig, AmphistaDrafter
from drafters.base import DecodeState
from drafters.medusa import MedusaConfig, MedusaDrafter

pytestmark = pytest.mark.slow

PREFIX = 800
ROUNDS = 5


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def test_incremental_amphista_beats_recomputation(real_target) -> None:
    model = real_target.model
    medusa = MedusaDrafter(MedusaConfig(tree_nodes=15))
    amphista = AmphistaDrafter(AmphistaConfig(tree_nodes=15))
    for drafter in (medusa, amphista):
        drafter.bind(model)
        drafter.eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (PREFIX + ROUNDS + 1,), generator=generator)
    hidden = torch.randn(PREFIX + ROUNDS, 576, generator=generator)

    def state(length: int, new_from: int) -> DecodeState:
        return DecodeState(tokens=tokens[:length], prompt_len=8, hidden={-1: hidden[: length - 1]}, new_from=new_from)

    def from_scratch(length: int) -> None:
        amphista.reset()
        amphista.propose(state(length, 0))

    amphista.propose(state(PREFIX, 0))  # prefill the incremental cache
    times: dict[str, list[float]] = {"medusa": [], "amphista": [], "amphista_scratch": []}
    for step in range(ROUNDS):
        length = PREFIX + step + 1
        step_state = state(length, length - 2)
        times["medusa"].append(timed(lambda: medusa.propose(step_state)))  # noqa: B023 - called at once
        times["amphista"].append(timed(lambda: amphista.propose(step_state)))  # noqa: B023
        times["amphista_scratch"].append(timed(lambda: from_scratch(length)))  # noqa: B023
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"\nmedian seconds per step at a {PREFIX}-token prefix: " + ", ".join(f"{k} {v:.4f}" for k, v in median.items())
    )
    print(
        f"amphista from scratch / incremental: {median['amphista_scratch'] / median['amphista']:.1f}x; "
        f"amphista / medusa: {median['amphista'] / median['medusa']:.1f}x"
    )
    assert median["amphista_scratch"] > 2 * median["amphista"]
