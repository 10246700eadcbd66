"""Greedy speculative decoding with Medusa and Amphista trees gives exactly plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, repetitive_llama

from draftsmith.drafters.amphista import AmphistaConfig, AmphistaDrafter
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 30


@pytest.fixture(scope="module")
def target():
    return repetitive_llama(layers=2)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (length,), generator=generator).tolist() for length in (1, 9)]


def drafter_for(kind: str, target, randomized: bool) -> Drafter:
    if kind == "medusa":
        drafter = MedusaDrafter(MedusaConfig(num_heads=3, tree_nodes=20, tree_topk=5))
    else:
        drafter = AmphistaDrafter(AmphistaConfig(num_heads=3, attention_heads=4, tree_nodes=20, tree_topk=5))
    drafter.bind(target)
    if randomized:  # a drafter whose guesses are mostly wrong exercises rejection and rollback
        torch.manual_seed(5)
        perturb(drafter, 0.3)
    return drafter.eval()


@pytest.mark.parametrize("randomized", [False, True], ids=["untrained", "randomized"])
@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_greedy_speculative_output_equals_plain_greedy(target, kind: str, randomized: bool) -> None:
    drafter = drafter_for(kind, target, randomized)
    assert_lossless_greedy(target, drafter, prompts(), NEW_TOKENS)
    steps = SpeculativeDecoder(target, eos_ids=set()).generate(prompts()[1], drafter, NEW_TOKENS).steps
    accepted = sum(step.accepted for step in steps)
    rejected = sum(step.offered > step.accepted for step in steps)
    assert accepted > 0 and rejected > 0, "the comparison must exercise both acceptance and rejection"
