"""Composed drafters (drafters/composed.py, ``drafter=ngram+PATH``): the merged trie by hand, the node budget,
loading from the ``drafter=`` spec, and lossless greedy and sampled decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, repetitive_llama, tiny_llama
from test_eval_sampling import VOCAB, assert_two_tokens_follow_the_target
from test_training_support import tiny_drafter, tiny_target

from draftsmith.drafters.base import Draft
from draftsmith.drafters.composed import ComposedDrafter, RankAcceptance, merge_drafts
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.ngram import NgramConfig, NgramDrafter
from draftsmith.drafters.sampling import SamplingConfig
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.loading import load_drafter
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def tree(tokens: list[int], parents: list[int]) -> Draft:
    return Draft(tokens=torch.tensor(tokens), parents=torch.tensor(parents))


def paths(draft: Draft) -> set[tuple[int, ...]]:
    """Every node as the token path from the root down to it."""
    tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
    found = []
    for node, parent in enumerate(parents):
        found.append((found[parent] if parent >= 0 else ()) + (tokens[node],))
    return set(found)


def test_merge_shares_prefixes_and_keeps_siblings_distinct():
    chain = Draft.chain([7, 8, 9])
    learned = tree([7, 5, 8, 1, 3, 9], [-1, -1, 0, 0, 1, 2])  # 7 -> {8 -> 9, 1}, 5 -> 3: shares 7 -> 8 -> 9
    values = [[0.9, 0.5, 0.2], [0.6, 0.3, 0.4, 0.1, 0.05, 0.35]]
    merged = merge_drafts([chain, learned], values, budget=None)
    # by value: 7 (0.9), 8 (0.5 from the chain, 0.4 from the tree), 9 (0.35 from the tree), 5, 1, 3
    assert merged.tokens.tolist() == [7, 8, 9, 5, 1, 3] and merged.parents.tolist() == [-1, 0, 1, -1, 0, 3]
    assert paths(merged) == paths(chain) | paths(learned)
    assert merged.probs is None


def test_merge_keeps_the_most_valuable_nodes_within_the_budget():
    chain = Draft.chain([7, 8, 9, 10])
    learned = tree([7, 5, 8, 1, 3], [-1, -1, 0, 0, 1])
    values = [[0.5, 0.4, 0.1, 0.05], [0.6, 0.3, 0.3, 0.2, 0.1]]
    merged = merge_drafts([chain, learned], values, budget=4)
    assert paths(merged) == {(7,), (7, 8), (5,), (7, 1)}  # 0.6, 0.4, 0.3, 0.2; a tie goes to the shallower
    assert merged.tokens.tolist() == [7, 8, 5, 1] and merged.parents.tolist() == [-1, 0, -1, 0]
    assert len(merge_drafts([Draft.empty(), Draft.empty()], [[], []], 8)) == 0


def test_rank_acceptance_is_measured_from_the_true_continuation():
    acceptance = RankAcceptance()
    learned = tree([7, 5, 8, 1, 3], [-1, -1, 0, 0, 1])  # 7 -> {8, 1}, 5 -> 3
    assert acceptance.values(learned) == pytest.approx([1 / 2, 1 / 3, 1 / 2 * 1 / 2, 1 / 2 * 1 / 3, 1 / 3 * 1 / 2])
    acceptance.observe(learned, [7, 1, 4])  # depth 1: rank 0 right; depth 2: rank 1 right; depth 3: nothing offered
    acceptance.observe(learned, [6, 2])  # depth 1: both wrong, the walk ends
    assert dict(acceptance.offered) == {(1, 0): 2, (1, 1): 2, (2, 0): 1, (2, 1): 1}
    assert dict(acceptance.hits) == {(1, 0): 1, (1, 1): 0, (2, 0): 0, (2, 1): 1}
    assert acceptance.rate(1, 0) == pytest.approx((1 + 1) / (2 + 2))
    assert acceptance.rate(2, 1) == pytest.approx((1 + 0.5) / (1 + 1.5))
    assert acceptance.rate(4, 0) == pytest.approx(0.5)  # never offered: the prior


@pytest.fixture(scope="module")
def target():
    return repetitive_llama()


def composed(target, tree_nodes: int = 10) -> ComposedDrafter:
    learned = MedusaDrafter(MedusaConfig(num_heads=3, tree_nodes=tree_nodes, tree_topk=4))
    learned.bind(target)
    torch.manual_seed(5)
    perturb(learned, 0.3)
    return ComposedDrafter([NgramDrafter(NgramConfig()), learned]).eval()


def test_greedy_decoding_is_lossless_within_the_budget(target):
    drafter = composed(target)
    sizes = []
    propose = drafter.propose

    def recorded(state):
        draft = propose(state)
        sizes.append(len(draft))
        return draft

    drafter.propose = recorded
    prompts = [[5], torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(0)).tolist()]
    assert_lossless_greedy(target, drafter, prompts, 40)
    assert max(sizes) <= drafter.max_draft_nodes() == 10
    steps = SpeculativeDecoder(target, eos_ids=set()).generate(prompts[1], drafter, 40).steps
    assert sum(s.accepted for s in steps) > 0 and sum(s.offered > s.accepted for s in steps) > 0


def test_accepts_at_least_as_much_as_each_part_on_repetitive_text(target):
    """Where the target repeats itself the n-gram chain is copied, and the merged tree keeps, by measured value,
    what each part gets right."""
    prompt = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder = SpeculativeDecoder(target, eos_ids=set())
    alone = composed(target)
    accepted = {
        name: sum(s.accepted for s in decoder.generate(prompt, drafter, 60).steps)
        for name, drafter in (("ngram", alone.parts[0]), ("medusa", alone.parts[1]), ("both", composed(target)))
    }
    assert accepted["both"] >= max(accepted["ngram"], accepted["medusa"]) > 0, accepted


def test_sampled_decoding_keeps_the_target_distribution():
    """test_eval_sampling's engine check with an n-gram chain merged with a Medusa tree: the prompt holds every
    token once, so whatever the first token is, the n-gram part copies what followed it. Temperature 4 flattens
    p, so the first draft token is accepted at times and rejected at others."""
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=1, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    learned = MedusaDrafter(MedusaConfig(num_heads=2, tree_nodes=6, tree_topk=3))
    learned.bind(model)
    torch.manual_seed(4)
    perturb(learned, 0.3)
    drafter = ComposedDrafter([NgramDrafter(NgramConfig()), learned]).eval()
    prompt, sampling = list(range(VOCAB)), SamplingConfig(temperature=4.0)
    assert_two_tokens_follow_the_target(model, drafter, prompt, sampling)


def test_drafter_spec_loads_both_parts_and_sizes_the_learned_tree(tmp_path):
    target = tiny_target()
    export = tiny_drafter(target, "medusa").save_pretrained(tmp_path / "export")
    drafter = load_drafter(f"ngram+{export}", target, tree_nodes=5)
    assert isinstance(drafter, ComposedDrafter) and not drafter.training
    first, second = drafter.parts
    assert isinstance(first, NgramDrafter) and isinstance(second, MedusaDrafter)
    assert drafter.max_draft_nodes() == 5 and len(second.draft_tree().paths) == 5
    assert drafter.draft_shape() == {"tree_nodes": 5, "composed_of": f"ngram+{export}"}
    assert drafter.target_needs().hidden_layers == (-1,)
    prompts = [torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(1)).tolist()]
    assert_lossless_greedy(target.model, drafter, prompts, 20)
