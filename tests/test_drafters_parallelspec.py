"""ParallelSpec: the group mask equals its dense reference, training sees what decoding sees, decoding is lossless."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, repetitive_llama, tiny_llama
from test_drafters_eagle3 import LAYERS, fitted, hidden_states
from test_eval_sampling import SAMPLING, VOCAB, assert_matches

from draftsmith.drafters.base import DecodeState
from draftsmith.drafters.parallelspec import (
    ParallelSpecConfig,
    ParallelSpecDrafter,
    flex_group_attention,
    group_mask_mod,
)
from draftsmith.drafters.sampling import warp
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return repetitive_llama(layers=3)


def drafter_for(model, **overrides) -> ParallelSpecDrafter:
    settings = {"feature_layers": LAYERS, "parallel_tokens": 3, "tree_nodes": 8, "tree_topk": 3}
    drafter = ParallelSpecDrafter(ParallelSpecConfig(**{**settings, **overrides}))
    drafter.bind(model)
    return drafter


def dense_group_mask(n: int, masks: int, inside: torch.Tensor) -> torch.Tensor:
    """The reference, written out row by row: [prefix ; groups] -> who may attend to whom."""
    rows = n * (1 + masks)
    dense = torch.zeros(inside.shape[0], rows, rows, dtype=torch.bool)
    for b in range(inside.shape[0]):
        for q in range(rows):
            for kv in range(rows):
                if q < n:
                    dense[b, q, kv] = kv < n and kv <= q and (bool(inside[b, kv]) or kv == q)
                else:
                    t, j = divmod(q - n, masks)
                    if kv < n:
                        dense[b, q, kv] = kv <= t and bool(inside[b, kv])
                    else:
                        t2, j2 = divmod(kv - n, masks)
                        dense[b, q, kv] = t2 == t and j2 <= j
    return dense


def test_block_sparse_group_attention_equals_the_dense_mask(target) -> None:
    drafter = drafter_for(target)
    n, masks = 6, 2
    inside = torch.ones(2, n, dtype=torch.bool)
    inside[1, 4:] = False
    mask_mod = group_mask_mod(n, masks, inside)
    rows = n * (1 + masks)
    grid = torch.arange(rows)
    flex_dense = torch.stack(
        [mask_mod(torch.tensor(b), torch.tensor(0), grid[:, None], grid[None, :]) for b in range(2)]
    )
    assert torch.equal(flex_dense, dense_group_mask(n, masks, inside))
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, rows, 8), torch.randn(2, 2, rows, 8), torch.randn(2, 2, rows, 8)
    reference = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=flex_dense[:, None]
    )
    torch.testing.assert_close(flex_group_attention(q, k, v, mask_mod, rows, False), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(drafter._attend(q, k, v, mask_mod, rows), reference, rtol=1e-5, atol=1e-5)


def test_group_training_equals_decoding(target) -> None:
    torch.manual_seed(0)
    drafter = drafter_for(target)
    perturb(drafter, 0.1)
    ids = torch.randint(3, 128, (1, 12))
    hidden = hidden_states(target, ids)
    with torch.no_grad():
        outputs = drafter.group_outputs(ids, torch.ones_like(ids, dtype=torch.bool), hidden)
        for t in (0, 4, 9):  # the root is token t + 1, position t the last verified one
            drafter.reset()
            state = DecodeState(
                tokens=ids[0, : t + 2], prompt_len=1, hidden={k: v[0, : t + 1] for k, v in hidden.items()}
            )
            expected = drafter.backbone.logits(outputs[0, t])
            torch.testing.assert_close(drafter.draft_logits(state), expected, rtol=1e-4, atol=1e-4)


def test_loss_counts_every_draft_position(target) -> None:
    drafter = drafter_for(target)
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    out = drafter.loss(
        {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}, {"hidden": hidden_states(target, ids)}
    )
    assert out.counts.tolist() == [8 + 5, 7 + 4, 6 + 3] and out.hits.shape == (3, 3)
    out.loss.backward()
    assert drafter.mask_embeds.grad is not None and drafter.backbone.fc.weight.grad is not None


def test_greedy_is_lossless_and_accepts(target) -> None:
    drafter = fitted(drafter_for(target), target, 120)
    sample = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    assert_lossless_greedy(target, drafter, sample, 30)
    steps = SpeculativeDecoder(target, eos_ids=set()).generate(sample[0], drafter, 30).steps
    assert sum(s.accepted for s in steps) > 0 and any(s.offered > s.accepted for s in steps)


def test_sampling_keeps_the_target_distribution() -> None:
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=3, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    prompt = [3, 4, 5]
    with torch.inference_mode():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], SAMPLING)
        p2 = warp(model(torch.tensor([prompt + [x] for x in range(VOCAB)])).logits[:, -1], SAMPLING)
    drafter = drafter_for(model, tree_nodes=6, tree_topk=3)
    decoder = SpeculativeDecoder(model, eos_ids=set(), sampling=SAMPLING, max_draft_nodes=8)
    generator = torch.Generator().manual_seed(12)
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(1_500):
        first, second = decoder.generate(prompt, drafter, 2, generator).tokens
        counts[first, second] += 1
    assert_matches(counts, p1[:, None] * p2)
