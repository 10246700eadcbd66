"""The ngram drafter proposes the continuation of the longest recent match and adapts its length."""

from __future__ import annotations

import torch

from draftsmith.drafters.base import DecodeState
from draftsmith.drafters.ngram import NgramConfig, NgramDrafter


def propose(drafter: NgramDrafter, tokens: list[int]) -> list[int]:
    return drafter.propose(DecodeState(tokens=torch.tensor(tokens), prompt_len=1)).tokens.tolist()


def test_longest_match_first_then_back_off():
    drafter = NgramDrafter(NgramConfig(max_n=3, adaptive=False))
    # the bigram (8, 3) occurred before 6; the unigram 3 most recently before 7
    assert propose(drafter, [8, 3, 6, 1, 3, 7, 2, 8, 3]) == [6, 1, 3, 7, 2, 8, 3]
    drafter.reset()
    assert propose(drafter, [4, 3, 6, 1, 3, 7, 2, 8, 3]) == [7, 2, 8, 3]
    drafter.reset()
    assert propose(drafter, [1, 2, 3, 4]) == []


def test_tree_of_alternatives_has_distinct_first_tokens():
    drafter = NgramDrafter(NgramConfig(max_n=3, branches=3, adaptive=False))
    draft = drafter.propose(DecodeState(tokens=torch.tensor([8, 3, 6, 1, 3, 7, 2, 8, 3]), prompt_len=1))
    roots = [t for t, p in zip(draft.tokens.tolist(), draft.parents.tolist()) if p == -1]
    assert roots == [6, 7]


def test_draft_length_follows_acceptance():
    drafter = NgramDrafter(NgramConfig(max_n=2, draft_len=6))
    sequence = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert propose(drafter, sequence) == [3, 4, 5, 6, 7, 8]
    # the target rejected the first drafted token and chose 5: a long match follows, but one token is drafted
    assert propose(drafter, sequence + [5]) == [6]
    assert propose(NgramDrafter(NgramConfig(max_n=2, draft_len=6, adaptive=False)), sequence + [5]) == [
        6,
        7,
        8,
        1,
        2,
        5,
    ]


def test_a_draft_size_caps_every_branch():
    drafter = NgramDrafter(NgramConfig(max_n=3, branches=2, adaptive=False))
    drafter.set_draft_size(5)  # the evaluator's tree_nodes=5: two branches of at most 2 tokens
    draft = drafter.propose(DecodeState(tokens=torch.tensor([8, 3, 6, 1, 3, 7, 2, 8, 3]), prompt_len=1))
    assert draft.tokens.tolist() == [6, 1, 7, 2] and draft.parents.tolist() == [-1, 0, -1, 2]
    assert drafter.draft_shape() == {"draft_len": 2, "branches": 2}
