"""Sparse candidate trees for multi-head drafters (Medusa, Amphista), built the Medusa-paper way.

A multi-head drafter gives, for each head d (1-based: head d guesses the token d steps below the root),
its top-R tokens. A tree node is a *path of ranks* ``(r1, ..., rd)``: take head 1's rank-r1 token, then
head 2's rank-r2 token below it, and so on. Its token is head d's rank-rd candidate; its parent is the
path without its last rank.

Greedy construction (Medusa paper, "optimized tree"): with ``rank_acc[d][r]`` the measured probability
that head d+1's rank-r candidate is the right token, a node's value is the product of ``rank_acc`` along
its path: the probability that the whole path gets accepted, which is the node's contribution to the
expected number of accepted tokens. Starting from the root, repeatedly add the highest-value node whose
parent is already in the tree, until the tree has ``n_nodes`` nodes. Since every ``rank_acc <= 1``, a
child is never worth more than its parent, so this is the best tree of that size under the model that
heads are independent.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from draftsmith.drafters.base import Draft
from draftsmith.drafters.errors import DraftsmithError

Path = tuple[int, ...]

# Medusa paper, Vicuna-7B: top-1 accuracy of heads 1..5. The prior for a fresh drafter before any measurement.
MEDUSA_VICUNA7B_TOP1 = (0.56, 0.32, 0.20, 0.15, 0.12)


def prior_rank_acc(num_heads: int, topk: int, top1: Sequence[float] = MEDUSA_VICUNA7B_TOP1) -> list[list[float]]:
    """Per-rank acceptance probabilities from head top-1 accuracies alone.

    Assumption: each rank is right with the same probability ``a`` (the head's top-1 accuracy) given that
    every higher rank was wrong, so rank r is right with probability ``a * (1 - a) ** r``. Heads past the
    end of ``top1`` continue its last ratio (``top1[-1] / top1[-2]``) geometrically.
    """
    if num_heads < 1 or topk < 1:
        raise DraftsmithError(f"a tree needs num_heads >= 1 and tree_topk >= 1, got {num_heads} and {topk}")
    accs = list(top1[:num_heads])
    ratio = top1[-1] / top1[-2] if len(top1) > 1 else 1.0
    while len(accs) < num_heads:
        accs.append(accs[-1] * ratio)
    return [[a * (1.0 - a) ** r for r in range(topk)] for a in accs]


def max_tree_nodes(num_heads: int, topk: int) -> int:
    """Nodes of the complete tree: ``topk + topk**2 + ... + topk**num_heads``."""
    return sum(topk**d for d in range(1, num_heads + 1))


def _checked_rank_acc(rank_acc: Sequence[Sequence[float]]) -> tuple[int, int]:
    """``(heads, ranks)`` of a rank-accuracy table, refused in one line when it is not one."""
    depth_max = len(rank_acc)
    topk = len(rank_acc[0]) if depth_max else 0
    if depth_max == 0 or topk == 0 or any(len(row) != topk for row in rank_acc):
        raise DraftsmithError("rank_acc must be a non-empty [heads][ranks] table with the same ranks for every head")
    if any(not 0.0 <= float(v) <= 1.0 for row in rank_acc for v in row):
        raise DraftsmithError("rank_acc holds probabilities: every value must lie in [0, 1]")
    return depth_max, topk


def greedy_nodes(rank_acc: Sequence[Sequence[float]]) -> Iterator[tuple[float, Path]]:
    """Every node of the complete tree as ``(value, path)``, in the order the greedy construction adds them
    (highest value first whose parent is in; ties to the smaller path). The first n form the n-node tree."""
    depth_max, topk = _checked_rank_acc(rank_acc)
    frontier = [(-float(rank_acc[0][r]), (r,)) for r in range(topk)]
    heapq.heapify(frontier)
    while frontier:
        neg_value, path = heapq.heappop(frontier)
        yield -neg_value, path
        if len(path) < depth_max:
            for r in range(topk):
                heapq.heappush(frontier, (neg_value * float(rank_acc[len(path)][r]), path + (r,)))


def build_tree(rank_acc: Sequence[Sequence[float]], n_nodes: int) -> list[Path]:
    """The greedy Medusa tree of ``n_nodes`` nodes (see module docstring), sorted by depth, then path.

    Ties go to the lexicographically smaller path, so the result is deterministic.
    """
    depth_max, topk = _checked_rank_acc(rank_acc)
    limit = max_tree_nodes(depth_max, topk)
    if not 0 <= n_nodes <= limit:
        raise DraftsmithError(
            f"tree_nodes={n_nodes} is impossible with {depth_max} heads and top-{topk}: use 0..{limit}"
        )
    chosen = [path for _, path in itertools.islice(greedy_nodes(rank_acc), n_nodes)]
    return sorted(chosen, key=lambda p: (len(p), p))


def expected_appended(rank_acc: Sequence[Sequence[float]], max_nodes: int) -> list[float]:
    """``E[tokens appended]`` of one verification with the greedy tree of n nodes, for n = 0 .. ``max_nodes``
    (at most the complete tree): 1 (the target's bonus token) + the values of the n nodes, each the chance
    that its whole path is accepted."""
    expected = [1.0]
    for value, _ in itertools.islice(greedy_nodes(rank_acc), max(max_nodes, 0)):
        expected.append(expected[-1] + value)
    return expected


@dataclass(frozen=True)
class CompiledTree:
    """A tree of rank paths as index tensors: node i takes ``topk_tokens[depths[i] - 1, ranks[i]]`` and
    hangs below node ``parents[i]`` (-1 = root). Built once per tree so each decoding step is one gather."""

    paths: tuple[Path, ...]
    depths: torch.Tensor  # [n] long, 1-based
    ranks: torch.Tensor  # [n] long
    parents: torch.Tensor  # [n] long

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        return max((p[-1] for p in self.paths), default=-1)


def compile_tree(paths: Sequence[Sequence[int]]) -> CompiledTree:
    """Check a tree (every path's parent present, no duplicates, ranks >= 0) and index it in topological
    order (by depth, then path)."""
    ordered = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    if len(ordered) != len(paths):
        raise DraftsmithError("the tree lists a path twice: every node must appear once")
    index = {path: i for i, path in enumerate(ordered)}
    parents = []
    for path in ordered:
        if not path or min(path) < 0:
            raise DraftsmithError(f"tree path {list(path)} is invalid: a path is a non-empty list of ranks >= 0")
        parent = path[:-1]
        if parent and parent not in index:
            raise DraftsmithError(f"tree path {list(path)} has no parent {list(parent)} in the tree: add it")
        parents.append(index[parent] if parent else -1)
    return CompiledTree(
        paths=tuple(ordered),
        depths=torch.tensor([len(p) for p in ordered], dtype=torch.long),
        ranks=torch.tensor([p[-1] for p in ordered], dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
    )


def tree_draft(paths: Sequence[Sequence[int]] | CompiledTree, topk_tokens: torch.Tensor) -> Draft:
    """Hang the tree's tokens below the root: node ``(r1..rd)`` gets ``topk_tokens[d-1, rd]``.

    ``topk_tokens`` is ``[K, R]``: row d-1 holds head d's candidates, best first. The Draft has
    ``probs=None`` (deterministic candidates) and lives on ``topk_tokens``' device.
    """
    tree = paths if isinstance(paths, CompiledTree) else compile_tree(paths)
    if topk_tokens.dim() != 2:
        raise DraftsmithError(f"topk_tokens must be [heads, ranks], got shape {tuple(topk_tokens.shape)}")
    if tree.max_depth > topk_tokens.shape[0] or tree.max_rank >= topk_tokens.shape[1]:
        raise DraftsmithError(
            f"the tree needs {tree.max_depth} heads and top-{tree.max_rank + 1} candidates, but the drafter gives "
            f"{topk_tokens.shape[0]} heads and top-{topk_tokens.shape[1]}: fix tree or tree_topk"
        )
    device = topk_tokens.device
    tokens = topk_tokens[tree.depths.to(device) - 1, tree.ranks.to(device)]
    return Draft(tokens=tokens.long(), parents=tree.parents.to(device))


# Pseudo-observations the training-measured accuracy of a (head, rank) counts for when acceptance seen while
# decoding refines it: about this many verifications at that node before the online figure dominates.
ONLINE_PRIOR_WEIGHT = 32.0


class TreeMixin:
    """The tree a drafter with per-position candidates (multi-head, ParallelSpec) hangs them in:
    ``config.tree`` if set, else the greedy tree of ``config.tree_nodes`` nodes built from ``config.rank_acc``
    (measured in training) or the prior (`prior_rank_acc`). It implements the Drafter hooks for that tree:
    ``calibrate`` rebuilds it from measured accuracies, ``set_draft_size`` resizes it.

    For an evaluator that sizes the tree per step (``tree_nodes=auto``) it also keeps the acceptance seen while
    decoding (`observe_acceptance`), blends it into the trained accuracies (`expected_appended`) and decodes with
    a tree of any size without touching the config (`shape_draft`), so an export keeps the tree it was trained
    with."""

    config: Any
    _compiled_tree: CompiledTree | None = None
    _online: tuple[list[list[float]], list[list[float]]] | None = None  # (hits, trials) per [head][rank]
    measured_fields = ("tree", "tree_nodes", "rank_acc")

    def calibrate(self, rank_accuracy: list[list[float]]) -> None:
        self.set_rank_accuracy(rank_accuracy)

    def restore_measured(self, values: dict[str, Any]) -> None:
        self.config.rank_acc = values.get("rank_acc")
        if values.get("tree") is not None:
            self.set_tree(values["tree"])

    def set_draft_size(self, nodes: int) -> None:
        self.resize_tree(nodes)

    def draft_shape(self) -> dict[str, Any]:
        return {"tree_nodes": len(self.draft_tree().paths)}

    def _checked_tree(self, paths: Sequence[Sequence[int]]) -> CompiledTree:
        compiled = compile_tree(paths)
        if compiled.max_depth > self.config.num_heads or compiled.max_rank >= self.config.tree_topk:
            raise DraftsmithError(
                f"the tree needs {compiled.max_depth} heads and top-{compiled.max_rank + 1}, but the drafter has "
                f"num_heads={self.config.num_heads} and tree_topk={self.config.tree_topk}: fix the tree or those fields"
            )
        return compiled

    def draft_tree(self) -> CompiledTree:
        if self._compiled_tree is None:
            paths = self.config.tree
            if paths is None:
                paths = build_tree(self._rank_acc(), self.config.tree_nodes)
            self._compiled_tree = self._checked_tree(paths)
        return self._compiled_tree

    def max_draft_nodes(self) -> int:
        return len(self.draft_tree().paths)

    def set_tree(self, paths: Sequence[Sequence[int]]) -> None:
        """Use ``paths`` (e.g. `build_tree` on measured accuracies) from now on; the export carries it."""
        compiled = self._checked_tree(paths)
        self.config.tree = [list(path) for path in compiled.paths]
        self.config.tree_nodes = len(compiled.paths)
        self._compiled_tree = compiled

    def _rank_acc(self) -> list[list[float]]:
        measured = self.config.rank_acc
        if measured is None:
            return prior_rank_acc(self.config.num_heads, self.config.tree_topk)
        return [[min(max(float(v), 0.0), 1.0) for v in row] for row in measured]

    def set_rank_accuracy(self, rank_acc: Sequence[Sequence[float]]) -> None:
        """Keep measured per-head, per-rank accuracies (the export carries them, so the tree can be rebuilt at
        another size later) and use the greedy tree of ``config.tree_nodes`` nodes built from them."""
        self.config.rank_acc = [[float(v) for v in row] for row in rank_acc]
        self.resize_tree(self.config.tree_nodes)

    def resize_tree(self, n_nodes: int) -> None:
        """Use the greedy tree of ``n_nodes`` nodes (at most the complete tree) from the measured accuracies.

        The best size is the hardware's: a CPU pays for every verified node, a GPU verifies 64 nodes for
        about the cost of one, so the evaluator may resize the tree a drafter was trained with.
        """
        rank_acc = self._rank_acc()
        if n_nodes < 1:
            raise DraftsmithError(f"tree_nodes={n_nodes}: a tree needs at least one node")
        self.set_tree(build_tree(rank_acc, min(n_nodes, max_tree_nodes(len(rank_acc), len(rank_acc[0])))))

    # -- sizing per step (tree_nodes=auto) ---------------------------------------------------------------

    def forget_acceptance(self) -> None:
        """Drop the acceptance seen while decoding (new weights, or a new evaluation)."""
        self._online = None

    def observe_acceptance(self, accepted: Sequence[int]) -> None:
        """Count, below each accepted node of the last verified draft (the current tree, or its first nodes),
        which ranks were offered (trials) and which one the target took (a hit). The counts are conditional on
        the path above being accepted, which is what a node's value multiplies."""
        paths = self.draft_tree().paths
        if self._online is None:
            size = (self.config.num_heads, self.config.tree_topk)
            self._online = tuple([[0.0] * size[1] for _ in range(size[0])] for _ in range(2))
        hits, trials = self._online
        offered: dict[Path, list[int]] = {}
        for path in paths:
            offered.setdefault(path[:-1], []).append(path[-1])
        parent: Path = ()
        for depth in range(self.config.num_heads):
            for rank in offered.get(parent, []):
                trials[depth][rank] += 1.0
            if depth >= len(accepted) or accepted[depth] >= len(paths):
                return
            parent = paths[accepted[depth]]
            hits[depth][parent[-1]] += 1.0

    def _blended_rank_acc(self) -> list[list[float]]:
        trained = self._rank_acc()
        if self._online is None:
            return trained
        hits, trials = self._online
        weight = ONLINE_PRIOR_WEIGHT
        return [
            [(weight * p + h) / (weight + t) for p, h, t in zip(row, hit_row, trial_row, strict=True)]
            for row, hit_row, trial_row in zip(trained, hits, trials, strict=True)
        ]

    def expected_appended(self, max_nodes: int) -> list[float]:
        """``E[tokens appended]`` per verification for each tree size 0 .. ``max_nodes`` (at most the complete
        tree), from the trained accuracies refined by the acceptance observed so far."""
        rank_acc = self._blended_rank_acc()
        return expected_appended(rank_acc, min(max_nodes, max_tree_nodes(len(rank_acc), len(rank_acc[0]))))

    def shape_draft(self, nodes: int | None) -> None:
        """Draft with the greedy tree of ``nodes`` nodes from the refined accuracies, leaving ``config.tree`` (what
        an export carries) alone; None = back to the configured tree."""
        if nodes is None:
            self._compiled_tree = None
            return
        if nodes < 1:
            raise DraftsmithError(f"tree_nodes={nodes}: a tree needs at least one node")
        rank_acc = self._blended_rank_acc()
        nodes = min(nodes, max_tree_nodes(len(rank_acc), len(rank_acc[0])))
        self._compiled_tree = self._checked_tree(build_tree(rank_acc, nodes))
