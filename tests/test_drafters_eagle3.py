"""EAGLE-3: the training-time test sees what decoding sees, decoding is lossless, training makes it accept."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, repetitive_llama, tiny_llama
from test_eval_sampling import SAMPLING, VOCAB, assert_matches

from draftsmith.drafters.backbone import step_zero
from draftsmith.drafters.base import DecodeState
from draftsmith.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from draftsmith.drafters.sampling import warp
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [1, 2, 3]


@pytest.fixture(scope="module")
def target():
    return repetitive_llama(layers=3)


def drafter_for(model, **overrides) -> Eagle3Drafter:
    settings = {"feature_layers": LAYERS, "ttt_steps": 3, "tree_nodes": 8, "tree_depth": 4, "tree_topk": 3}
    drafter = Eagle3Drafter(Eagle3Config(**{**settings, **overrides}))
    drafter.bind(model)
    return drafter


def hidden_states(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return {layer: out.hidden_states[layer] for layer in LAYERS}


def test_training_unroll_equals_decoding_along_the_true_path(target) -> None:
    """Step i of the unroll at index t = the feature decoding computes for the depth-(i+1) node on the true path."""
    torch.manual_seed(0)
    drafter = drafter_for(target)
    perturb(drafter, 0.1)
    ids = torch.randint(3, 128, (1, 12))
    hidden = hidden_states(target, ids)
    steps = drafter.unroll(ids, torch.ones_like(ids, dtype=torch.bool), hidden)
    t = 5  # the root is token t + 1; its position t is the last verified one
    with torch.no_grad():
        drafter.reset()
        root = step_zero(
            drafter.backbone,
            drafter.cache,
            {k: v[0, : t + 1] for k, v in hidden.items()},
            ids[0, : t + 2],
            drafter.config.layers(),
            0,
        )
        torch.testing.assert_close(root, steps[0][0, t], rtol=1e-5, atol=1e-5)
        tokens, parents, outputs, kv_index, tree_k, tree_v = [int(ids[0, t + 2])], [-1], {}, {}, [], []
        for depth in (1, 2):
            node = len(tokens) - 1
            out, k, v = drafter._expand(
                drafter.backbone, [node], tokens, parents, outputs, kv_index, tree_k, tree_v, root, depth
            )
            outputs[node], kv_index[node] = out[0], len(tree_k)
            tree_k.append(k)
            tree_v.append(v)
            torch.testing.assert_close(out[0], steps[depth][0, t], rtol=1e-5, atol=1e-5)
            tokens.append(int(ids[0, t + 2 + depth]))
            parents.append(node)


def test_loss_counts_and_backpropagates(target) -> None:
    drafter = drafter_for(target)
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    out = drafter.loss(batch, {"hidden": hidden_states(target, ids)})
    assert out.counts.tolist() == [8 + 5, 7 + 4, 6 + 3]
    assert out.hits.shape == (3, 4) and bool((out.hits.sum(1) <= out.counts).all())
    out.loss.backward()
    assert drafter.backbone.fc.weight.grad is not None and drafter.backbone.lm_head.weight.grad is not None
    assert drafter.target_needs().hidden_layers == tuple(LAYERS)


def fitted(drafter, target, steps: int):
    """``drafter`` fitted to the target's own greedy continuations, so decoding accepts some of its drafts."""
    torch.manual_seed(1)
    prompts = torch.randint(3, 128, (16, 4))
    with torch.no_grad():
        ids = target.generate(prompts, max_new_tokens=28, do_sample=False, pad_token_id=0)
    hidden = hidden_states(target, ids)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    ones = torch.ones_like(ids)
    for _ in range(steps):
        optimizer.zero_grad()
        drafter.loss({"input_ids": ids, "attention_mask": ones, "loss_mask": ones}, {"hidden": hidden}).loss.backward()
        optimizer.step()
    return drafter.eval()


def test_greedy_is_lossless_and_accepts(target) -> None:
    drafter = fitted(drafter_for(target), target, 150)
    prompts = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    assert_lossless_greedy(target, drafter, prompts, 30)
    chain = drafter_for(target, tree_topk=1, tree_nodes=4)
    chain.load_state_dict(drafter.state_dict())
    assert_lossless_greedy(target, chain, prompts, 30)
    steps = SpeculativeDecoder(target, eos_ids=set()).generate(prompts[0], drafter, 30).steps
    assert sum(s.accepted for s in steps) > 0 and any(s.offered > s.accepted for s in steps)


def test_the_tree_respects_its_budget_and_shape(target) -> None:
    drafter = drafter_for(target, tree_nodes=7, tree_depth=3, tree_topk=3)
    ids = torch.randint(3, 128, (1, 6))
    hidden = hidden_states(target, ids[:, :-1])
    state = DecodeState(tokens=ids[0], prompt_len=6, hidden={k: v[0] for k, v in hidden.items()})
    draft = drafter.propose(state)
    assert len(draft) == 7 and bool((draft.parents < torch.arange(7)).all())
    depths = []
    for parent in draft.parents.tolist():
        depths.append(1 if parent < 0 else depths[parent] + 1)
    assert max(depths) <= 3
    assert drafter.draft_shape() == {"tree_nodes": 7, "tree_depth": 3, "tree_topk": 3}


def test_sampling_keeps_the_target_distribution() -> None:
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=3, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    prompt = [3, 4, 5]
    with torch.inference_mode():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], SAMPLING)
        p2 = warp(model(torch.tensor([prompt + [x] for x in range(VOCAB)])).logits[:, -1], SAMPLING)
    drafter = Eagle3Drafter(Eagle3Config(feature_layers=LAYERS, tree_nodes=6, tree_depth=3, tree_topk=2))
    drafter.bind(model)
    decoder = SpeculativeDecoder(model, eos_ids=set(), sampling=SAMPLING, max_draft_nodes=8)
    generator = torch.Generator().manual_seed(12)
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(1_500):
        first, second = decoder.generate(prompt, drafter, 2, generator).tokens
        counts[first, second] += 1
    assert_matches(counts, p1[:, None] * p2)
