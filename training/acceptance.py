"""Acceptance estimates from per-position draft accuracies (training-time proxies of eval's tau)."""

from __future__ import annotations

import torch


def chain_tau(acc: torch.Tensor) -> float:
    """Expected tokens per target forward for a greedy chain: 1 + sum_k prod_{j<=k} acc_j.

    ``acc[k]`` is the top-1 accuracy of draft position k+1; the leading 1 is the target's bonus token.
    """
    return float(1.0 + torch.cumprod(acc.double().clamp(0.0, 1.0), dim=0).sum())


def rank_accuracy(hits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per-position, per-rank accuracy ``[K, R]``: the share of positions whose target token was the
    drafter's rank-r candidate at position k (``hits[k, r]`` counts them, ``n[k]`` counts positions)."""
    return hits.double() / n.double().clamp(min=1.0).unsqueeze(-1)


def topk_accuracy(hits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per-position top-k accuracy ``[K]`` for k = number of ranks counted in ``hits``."""
    return rank_accuracy(hits, n).sum(dim=-1)
