"""Speculative sampling is lossless in distribution, for chains and trees (chi-square goodness of fit).

Each test draws the first two tokens many times with a fixed seed and compares their joint counts with the
exact target distribution p(x1) p(x2 | x1). Cells expected below 5 are pooled. The test fails when the
chi-square p-value is below 1e-3 (with fixed seeds, the outcome is deterministic).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from scipy.stats import chisquare

from draftsmith.drafters import trees as tree
from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig
from draftsmith.drafters.sampling import SamplingConfig, warp
from draftsmith.eval import acceptance
from draftsmith.eval.engine import SpeculativeDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 16
P_THRESHOLD = 1e-3
SAMPLING = SamplingConfig(temperature=1.0)


def assert_matches(counts: torch.Tensor, expected_probs: torch.Tensor) -> None:
    expected = expected_probs.flatten().double() * counts.sum()
    observed = counts.flatten().double()
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    expected *= observed.sum() / expected.sum()
    p_value = chisquare(observed.numpy(), expected.numpy()).pvalue
    assert p_value > P_THRESHOLD, f"speculative sampling is off the target distribution (p = {p_value:.2e})"


def assert_two_tokens_follow_the_target(model, drafter, prompt: list[int], sampling: SamplingConfig) -> None:
    """Sample two tokens 1,000 times with ``drafter``: their joint counts must match the target's p(x1) p(x2 | x1)
    (chi-square), and the first draft token must be accepted at times and rejected at others, so both branches of
    the acceptance rule decide the second token often."""
    with torch.inference_mode():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], sampling)
        p2 = warp(model(torch.tensor([prompt + [x] for x in range(VOCAB)])).logits[:, -1], sampling)
    decoder = SpeculativeDecoder(model, eos_ids=set(), sampling=sampling, max_draft_nodes=8)
    generator = torch.Generator().manual_seed(12)
    counts = torch.zeros(VOCAB, VOCAB)
    first_accepted = 0
    for _ in range(1_000):
        generation = decoder.generate(prompt, drafter, 2, generator)
        counts[tuple(generation.tokens)] += 1
        first_accepted += generation.steps[0].accepted > 0
    assert 100 < first_accepted < 900  # acceptances and rejections both decide the second token often
    assert_matches(counts, p1[:, None] * p2)


def skewed_q(seed: int) -> torch.Tensor:
    """A drafter distribution deliberately unlike the target's, so rejections are frequent."""
    return torch.softmax(2.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)), dim=-1)


SHAPES = {
    "chain": [-1, 0, 1],
    "tree": [-1, -1, -1, 0, 1, 1, 2],
}


def sample_draft(parents: list[int], q: torch.Tensor, with_q: bool, generator: torch.Generator) -> Draft:
    """Nodes drawn i.i.d. from q (carrying q), or distinct deterministic candidates per sibling group."""
    n = len(parents)
    if with_q:
        tokens = torch.multinomial(q, n, replacement=True, generator=generator)
        return Draft(tokens=tokens, parents=torch.tensor(parents), probs=q.expand(n, VOCAB))
    tokens = torch.empty(n, dtype=torch.long)
    for parent in set(parents):
        members = [i for i, p in enumerate(parents) if p == parent]
        tokens[members] = torch.multinomial(q, len(members), replacement=False, generator=generator)
    return Draft(tokens=tokens, parents=torch.tensor(parents))


@pytest.mark.parametrize("with_q", [True, False], ids=["q", "deterministic"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_acceptance_rule_is_lossless(shape, with_q):
    """The verification rule alone, with a two-level synthetic target: p(x1) and p(x2 | x1)."""
    generator = torch.Generator().manual_seed(7)
    first_logits = 1.5 * torch.randn(VOCAB, generator=generator)
    second_logits = 1.5 * torch.randn(VOCAB, VOCAB, generator=generator)
    p1, p2 = warp(first_logits, SAMPLING), warp(second_logits, SAMPLING)
    q = skewed_q(3)
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(6_000):
        draft = sample_draft(SHAPES[shape], q, with_q, generator)
        layout = tree.layout(draft.parents)
        # a row's target logits depend on the token at depth 1 of its path (depth-2 rows are never read
        # for the first two tokens, so any logits do there)
        rows = [first_logits]
        for node, parent in enumerate(draft.parents.tolist()):
            depth1 = node if parent < 0 else parent
            rows.append(second_logits[draft.tokens[depth1]])
        verdict = acceptance.accept_sampling(draft, layout, torch.stack(rows), SAMPLING, generator)
        appended = draft.tokens[verdict.path].tolist() + [verdict.bonus]
        if len(appended) == 1:  # the next step is plain sampling as far as the second token goes
            appended.append(int(torch.multinomial(p2[appended[0]], 1, generator=generator)))
        counts[appended[0], appended[1]] += 1
    assert_matches(counts, p1[:, None] * p2)


class SkewedDrafter(Drafter):
    """Samples its tree i.i.d. from a fixed q that ignores the context (so it is often wrong)."""

    config_class = DrafterConfig

    def __init__(self, parents: list[int], with_q: bool) -> None:
        super().__init__(DrafterConfig())
        self.parents, self.with_q, self.q = parents, with_q, skewed_q(5)

    def propose(self, state: DecodeState) -> Draft:
        return sample_draft(self.parents, self.q, self.with_q, state.generator)


@pytest.mark.parametrize(("shape", "with_q"), [("chain", True), ("tree", False)])
def test_engine_sampling_is_lossless(shape, with_q):
    """End to end through the engine: the second token is the first one speculation decides."""
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=1, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    prompt = [3, 4, 5]
    with torch.inference_mode():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], SAMPLING)
        pairs = torch.tensor([prompt + [x] for x in range(VOCAB)])
        p2 = warp(model(pairs).logits[:, -1], SAMPLING)
    decoder = SpeculativeDecoder(model, eos_ids=set(), sampling=SAMPLING, max_draft_nodes=8)
    drafter = SkewedDrafter(SHAPES[shape], with_q)
    generator = torch.Generator().manual_seed(12)
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(2_000):
        first, second = decoder.generate(prompt, drafter, 2, generator).tokens
        counts[first, second] += 1
    assert_matches(counts, p1[:, None] * p2)
