"""Geometry of a draft tree for one verification forward: who sees whom, at which position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.drafters.base import Draft
from draftsmith.drafters.errors import DraftsmithError


@dataclass(frozen=True)
class TreeLayout:
    """Rows are ``[root, node 0, node 1, ...]`` (row ``i + 1`` is draft node ``i``).

    ``depths[r]``: distance from the root (root = 0), added to the root's position.
    ``visible[r, c]``: row ``r`` attends to row ``c`` (itself and its ancestors, the root included).
    ``children[r]``: draft-node indices hanging below row ``r``, in draft order (sibling order matters
    for sampling acceptance).
    """

    depths: torch.Tensor
    visible: torch.Tensor
    children: list[list[int]]


def validate(draft: Draft) -> None:
    n = len(draft)
    if draft.parents.numel() != n:
        raise DraftsmithError(f"draft has {n} tokens but {draft.parents.numel()} parents; give one parent per node")
    parents = draft.parents.cpu()
    if n and bool((parents >= torch.arange(n)).any() or (parents < -1).any()):
        raise DraftsmithError("draft parents must satisfy -1 <= parents[i] < i (topological order)")
    if draft.probs is not None and draft.probs.shape[0] != n:
        raise DraftsmithError(f"draft has {n} tokens but probs for {draft.probs.shape[0]} nodes")


def truncate(draft: Draft, max_nodes: int) -> Draft:
    """The first ``max_nodes`` nodes (still a tree: nodes are in topological order), with tokens and
    parents on the CPU where the engine walks the tree; ``probs`` stay where the drafter made them."""
    probs = None if draft.probs is None else draft.probs[:max_nodes]
    tokens = draft.tokens[:max_nodes].to("cpu", torch.long)
    return Draft(tokens=tokens, parents=draft.parents[:max_nodes].to("cpu", torch.long), probs=probs)


def layout(parents: torch.Tensor) -> TreeLayout:
    rows = parents.numel() + 1
    parent_rows = (parents + 1).tolist()  # row index of each node's parent (root row = 0)
    visible = torch.eye(rows, dtype=torch.bool)
    depths = [0] * rows
    children: list[list[int]] = [[] for _ in range(rows)]
    for node, parent_row in enumerate(parent_rows):
        row = node + 1
        visible[row] |= visible[parent_row]
        depths[row] = depths[parent_row] + 1
        children[parent_row].append(node)
    return TreeLayout(depths=torch.tensor(depths, dtype=torch.long), visible=visible, children=children)
