"""Composed drafters (``drafter=ngram+PATH``): two drafters' proposals merged into one draft tree, the idea of
REST / SAM-decoding style hybrids.

Copying from the context (the n-gram lookup) and predicting from the target's features (a trained drafter) catch
different tokens (issue 19: on chat questions ngram reached tau 1.62, the default Amphista export 1.49). Both
parts propose below the same root every step, and the composed draft is the union of their trees as a token trie,
its nodes ranked by value, Medusa / Sequoia style:

- a part's node is worth the probability that it is on the accepted path: the product, along its path, of
  ``rate(depth, rank)``, the measured chance that a node's rank-th child (in the part's own order: a rank-path
  tree's ranks, EAGLE's confidence order, the n-gram's one continuation) is the target's next token
  (`RankAcceptance`). The rates are measured online per part, from the tokens the target appended after each
  draft (the accepted path and the bonus token: the true continuation), so they follow how well each part does on
  the text at hand; before any measurement a rank-r child is worth 1 / (r + 2);
- a node both parts propose is merged into one (deduplicated shared prefixes) and takes the higher value; every
  node's children are distinct tokens;
- the nodes are ordered by value (a child is never worth more than its parent, so the order is topological) and
  the ``budget`` most valuable are kept: the second part's own draft size (the learned drafter's ``tree_nodes``,
  or the evaluator's ``tree_nodes=N``), so one verification costs what the learned drafter's alone does. A
  cost model that cuts the draft to its first n nodes (``tree_nodes=auto``) keeps the n most valuable.

The merged nodes are deterministic candidates (``probs=None``): the engine accepts each with the target's own
probability, which is lossless for any tree whose siblings are distinct, so greedy decoding equals plain greedy
decoding and sampling keeps the target's distribution, whatever each part proposed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from draftsmith.drafters.base import Decoder, DecodeState, Draft, Drafter, DrafterConfig, TargetNeeds, UsesDecoder
from draftsmith.drafters.errors import DraftsmithError


@dataclass
class ComposedConfig(DrafterConfig):
    """``parts``: the two drafters' names as given (a kind, an export folder or a Hub id), for reports;
    ``tree_nodes``: the budget when the evaluator sets one (None = the second part's own draft size)."""

    kind: ClassVar[str] = "composed"

    parts: tuple[str, ...] = ()
    tree_nodes: int | None = None

    def __post_init__(self) -> None:
        if self.tree_nodes is not None and self.tree_nodes < 1:
            raise DraftsmithError(f"tree_nodes={self.tree_nodes}: a composed draft needs at least one node")


def children_of(draft: Draft) -> dict[int, list[int]]:
    """Each node's children in draft order (-1 = the root)."""
    children: dict[int, list[int]] = defaultdict(list)
    for node, parent in enumerate(draft.parents.tolist()):
        children[parent].append(node)
    return children


class RankAcceptance:
    """How often a part's rank-r child at depth d was the target's next token, given its parent was: hits and
    offers per (depth, rank), read off the true continuation after each draft."""

    def __init__(self) -> None:
        self.hits: dict[tuple[int, int], int] = defaultdict(int)
        self.offered: dict[tuple[int, int], int] = defaultdict(int)

    def rate(self, depth: int, rank: int) -> float:
        prior = 1.0 / (rank + 1)  # Beta(prior, 1): mean 1 / (rank + 2) before any measurement
        return (self.hits[depth, rank] + prior) / (self.offered[depth, rank] + prior + 1.0)

    def observe(self, draft: Draft, truth: list[int]) -> None:
        """Walk ``draft`` down along ``truth`` (the tokens that followed its root), counting each depth's offers."""
        children, tokens = children_of(draft), draft.tokens.tolist()
        node = -1
        for depth, token in enumerate(truth, start=1):
            below = children.get(node, [])
            for rank, child in enumerate(below):
                self.offered[depth, rank] += 1
                self.hits[depth, rank] += tokens[child] == token
            node = next((child for child in below if tokens[child] == token), None)
            if node is None:
                return

    def values(self, draft: Draft) -> list[float]:
        """Each node's value: the product of the rates along its path."""
        values: list[float] = []
        seen: dict[int, int] = defaultdict(int)
        depths: list[int] = []
        for parent in draft.parents.tolist():
            rank = seen[parent]
            seen[parent] += 1
            depth = 1 if parent < 0 else depths[parent] + 1
            depths.append(depth)
            values.append((1.0 if parent < 0 else values[parent]) * self.rate(depth, rank))
        return values


def merge_drafts(drafts: list[Draft], values: list[list[float]], budget: int | None) -> Draft:
    """The drafts' union as a token trie, a node proposed twice taking the higher value, cut to the ``budget``
    (None = no cut) most valuable nodes, in order of value (ties: the shallower, then the first proposed)."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    worth: list[float] = []
    trie: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for draft, draft_values in zip(drafts, values, strict=True):
        merged: list[int] = []  # this draft's node -> its merged node
        for token, parent, value in zip(draft.tokens.tolist(), draft.parents.tolist(), draft_values, strict=True):
            above = -1 if parent < 0 else merged[parent]
            node = trie.get((above, token))
            if node is None:
                node = trie[(above, token)] = len(tokens)
                tokens.append(token)
                parents.append(above)
                depths.append(1 if above < 0 else depths[above] + 1)
                worth.append(value)
            worth[node] = max(worth[node], value)
            merged.append(node)
    order = sorted(range(len(tokens)), key=lambda n: (-worth[n], depths[n], n))[:budget]
    position = {node: i for i, node in enumerate(order)}
    return Draft(
        tokens=torch.tensor([tokens[n] for n in order], dtype=torch.long),
        parents=torch.tensor([-1 if parents[n] < 0 else position[parents[n]] for n in order], dtype=torch.long),
    )


class ComposedDrafter(Drafter):
    """Two drafters proposing as one (see the module docstring). Not a registered kind: `eval.loading` builds it
    from ``drafter=FIRST+SECOND`` with both parts loaded and bound to the target."""

    config_class = ComposedConfig
    config: ComposedConfig

    def __init__(self, parts: list[Drafter], config: ComposedConfig | None = None) -> None:
        if len(parts) != 2:
            raise DraftsmithError(f"a composed drafter has two parts, got {len(parts)}")
        super().__init__(config or ComposedConfig(parts=tuple(part.config.kind for part in parts)))
        self.parts = nn.ModuleList(parts)
        # measured over the whole evaluation: how well each part drafts is a property of the part and the text
        self.acceptance = [RankAcceptance() for _ in parts]
        self.reset()

    def budget(self) -> int | None:
        """The most nodes a merged draft has: ``tree_nodes`` if set, else the second part's own draft size."""
        return self.config.tree_nodes if self.config.tree_nodes is not None else self.parts[1].max_draft_nodes()

    def target_needs(self) -> TargetNeeds:
        needs = [part.target_needs() for part in self.parts]
        layers = sorted({layer for need in needs for layer in need.hidden_layers})
        return TargetNeeds(hidden_layers=tuple(layers), logits=any(need.logits for need in needs))

    def reset(self) -> None:
        self._drafts: list[Draft] = []
        self._root_length = 0
        for part in self.parts:
            part.reset()

    def attach_decoder(self, decoder: Decoder) -> None:
        for part in self.parts:
            if isinstance(part, UsesDecoder):
                part.attach_decoder(decoder)

    def max_draft_nodes(self) -> int | None:
        budget = self.budget()
        if budget is not None:
            return budget
        sizes = [part.max_draft_nodes() for part in self.parts]
        return None if None in sizes else sum(sizes)

    def set_draft_size(self, nodes: int) -> None:
        """The merged draft's budget, and the learned (second) part's tree at that size."""
        self.parts[1].set_draft_size(nodes)
        self.config.tree_nodes = nodes

    def draft_shape(self) -> dict[str, Any]:
        return {"tree_nodes": self.budget(), "composed_of": "+".join(self.config.parts)}

    def _learn(self, tokens: torch.Tensor) -> None:
        """Score the previous drafts against what the target appended since (accepted tokens and bonus)."""
        if self._drafts and tokens.numel() > self._root_length:
            truth = tokens[self._root_length :].tolist()
            for acceptance, draft in zip(self.acceptance, self._drafts, strict=True):
                acceptance.observe(draft, truth)

    def propose(self, state: DecodeState) -> Draft:
        self._learn(state.tokens)
        self._drafts = [part.propose(state) for part in self.parts]
        self._root_length = state.tokens.numel()
        values = [acceptance.values(draft) for acceptance, draft in zip(self.acceptance, self._drafts, strict=True)]
        return merge_drafts(self._drafts, values, self.budget())
