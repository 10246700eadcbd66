"""Which draft tokens the target accepts: greedy (exact) or speculative sampling (lossless in distribution).

Sampling walks the tree from the root. At each node with target distribution p it tries the children in
order. A child drawn from a drafter distribution q (``Draft.probs``) is accepted with min(1, p(x)/q(x)); on
rejection p <- norm(max(p - q, 0)). A deterministic child (no q) is accepted with probability p(x); on
rejection p(x) <- 0 and p is renormalised. When no child is accepted, the bonus token is drawn from what is
left of p; after the last accepted node it is drawn from that node's p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.drafters.base import Draft
from draftsmith.drafters.sampling import SamplingConfig, warp
from draftsmith.drafters.trees import TreeLayout


@dataclass(frozen=True)
class Verdict:
    """``path``: accepted draft-node indices from the root down; ``bonus``: the target's own next token;
    ``offered``: draft tokens the path had a chance to accept (``len(path)`` plus one if the last accepted
    node, or the root, had children), the denominator of alpha_k."""

    path: list[int]
    bonus: int
    offered: int


def accept_greedy(draft: Draft, tree: TreeLayout, logits: torch.Tensor) -> Verdict:
    """``logits``: [rows, vocab], row 0 = root. Accept the child equal to the target's argmax."""
    best = logits.argmax(dim=-1).tolist()
    tokens = draft.tokens.tolist()
    path: list[int] = []
    row = 0
    while True:
        child = next((c for c in tree.children[row] if tokens[c] == best[row]), None)
        if child is None:
            offered = len(path) + (1 if tree.children[row] else 0)
            return Verdict(path=path, bonus=best[row], offered=offered)
        path.append(child)
        row = child + 1


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    rest = (p - q).clamp_min(0.0)
    total = rest.sum()
    # p == q up to rounding: the rejection had probability ~0, any renormalised p is as good
    return rest / total if total > 0 else p


def accept_sampling(
    draft: Draft,
    tree: TreeLayout,
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> Verdict:
    target_probs = warp(logits, sampling)
    tokens = draft.tokens.tolist()
    path: list[int] = []
    row = 0
    while True:
        p = target_probs[row].clone()
        accepted = None
        for child in tree.children[row]:
            x = tokens[child]
            u = float(torch.rand((), generator=generator))
            if draft.probs is None:
                if u < float(p[x]):
                    accepted = child
                    break
                p[x] = 0.0
                total = p.sum()
                if total <= 0:
                    break
                p = p / total
            else:
                q = draft.probs[child].to(p)
                qx = float(q[x])
                if qx <= 0 or u < min(1.0, float(p[x]) / qx):
                    accepted = child
                    break
                p = _residual(p, q)
        if accepted is None:
            offered = len(path) + (1 if tree.children[row] else 0)
            return Verdict(path=path, bonus=_sample(p, generator), offered=offered)
        path.append(accepted)
        row = accepted + 1
