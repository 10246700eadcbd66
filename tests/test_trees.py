"""Greedy Medusa tree construction and hanging candidate tokens in a tree."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftsmith.drafters.base import LossOutput
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.rank_trees import (
    MEDUSA_VICUNA7B_TOP1,
    build_tree,
    compile_tree,
    max_tree_nodes,
    prior_rank_acc,
    tree_draft,
)


def path_value(rank_acc: list[list[float]], path: tuple[int, ...]) -> float:
    return math.prod(rank_acc[depth][rank] for depth, rank in enumerate(path))


def test_greedy_choice_on_hand_example() -> None:
    # values: (0)=.6 (1)=.25 (0,0)=.3 (0,1)=.12 (1,0)=.125 (1,1)=.05
    rank_acc = [[0.6, 0.25], [0.5, 0.2]]
    assert build_tree(rank_acc, 3) == [(0,), (1,), (0, 0)]
    # (1, 0) = .125 beats (0, 1) = .12, and it may join because its parent (1,) came first
    assert build_tree(rank_acc, 4) == [(0,), (1,), (0, 0), (1, 0)]
    assert build_tree(rank_acc, 6) == [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]


def test_a_node_needs_its_parent_even_when_deeper_heads_are_sure() -> None:
    rank_acc = [[0.5, 0.4], [1.0, 1.0]]
    assert build_tree(rank_acc, 3) == [(0,), (0, 0), (0, 1)]
    assert build_tree(rank_acc, 4) == [(0,), (1,), (0, 0), (0, 1)]


rank_tables = st.integers(1, 3).flatmap(
    lambda heads: st.integers(1, 3).flatmap(
        lambda ranks: st.lists(
            st.lists(st.floats(0.0, 1.0), min_size=ranks, max_size=ranks), min_size=heads, max_size=heads
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(rank_acc=rank_tables, data=st.data())
def test_greedy_tree_is_a_valid_tree_of_maximal_expected_acceptance(rank_acc: list[list[float]], data) -> None:
    heads, ranks = len(rank_acc), len(rank_acc[0])
    every_node = [p for d in range(1, heads + 1) for p in itertools.product(range(ranks), repeat=d)]
    n_nodes = data.draw(st.integers(0, len(every_node)))
    tree = build_tree(rank_acc, n_nodes)
    assert len(tree) == len(set(tree)) == n_nodes
    assert all(len(p) == 1 or p[:-1] in tree[: tree.index(p)] for p in tree)
    # a child is never worth more than its parent, so the best subtree holds the n most valuable nodes
    best = sorted((path_value(rank_acc, p) for p in every_node), reverse=True)[:n_nodes]
    assert sum(path_value(rank_acc, p) for p in tree) == pytest.approx(sum(best))


def test_build_tree_rejects_impossible_requests() -> None:
    with pytest.raises(DraftsmithError, match="tree_nodes=7"):
        build_tree([[0.5, 0.5], [0.5, 0.5]], 7)
    with pytest.raises(DraftsmithError, match=r"\[0, 1\]"):
        build_tree([[1.5]], 1)
    with pytest.raises(DraftsmithError, match="non-empty"):
        build_tree([], 1)


def test_tree_draft_tokens_parents_and_topological_order() -> None:
    topk_tokens = torch.tensor([[10, 11], [20, 21], [30, 31]])
    shuffled = [(0, 0, 0), (1, 0), (0, 1), (1,), (0, 0), (0,)]
    draft = tree_draft(shuffled, topk_tokens)
    # order: (0) (1) (0,0) (0,1) (1,0) (0,0,0)
    assert draft.tokens.tolist() == [10, 11, 20, 21, 20, 30]
    assert draft.parents.tolist() == [-1, -1, 0, 0, 1, 2]
    assert draft.probs is None
    assert all(parent < i for i, parent in enumerate(draft.parents.tolist()))


def test_tree_checks() -> None:
    with pytest.raises(DraftsmithError, match="no parent"):
        compile_tree([(0,), (1, 0)])
    with pytest.raises(DraftsmithError, match="twice"):
        compile_tree([(0,), (0,)])
    with pytest.raises(DraftsmithError, match="tree_topk"):
        tree_draft([(0,), (2,)], torch.tensor([[1, 2]]))
    with pytest.raises(DraftsmithError, match="tree_topk"):
        tree_draft([(0,), (0, 0)], torch.tensor([[1, 2]]))


def test_prior_follows_the_paper_accuracies_and_a_geometric_rank_decay() -> None:
    prior = prior_rank_acc(7, 4)
    assert [row[0] for row in prior[:5]] == list(MEDUSA_VICUNA7B_TOP1)
    assert prior[0][1] == pytest.approx(0.56 * 0.44)
    assert prior[5][0] == pytest.approx(0.12 * 0.12 / 0.15)
    assert all(sum(row) <= 1.0 for row in prior)
    default = build_tree(prior_rank_acc(4, 10), 63)
    assert len(default) == 63 and max(len(p) for p in default) <= 4
    assert max_tree_nodes(4, 10) == 11110


def test_loss_output_rank_accuracy() -> None:
    hits = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    out = LossOutput(loss=torch.tensor(0.0), hits=hits, counts=torch.tensor([4.0, 0.0]))
    assert out.rank_accuracy() == [[0.75, 0.25], [0.0, 0.0]]
    assert out.top1().tolist() == [0.75, 0.0]
