"""How target (and drafter) logits become the distribution tokens are drawn from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.drafters.errors import DraftsmithError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy decoding; otherwise softmax(logits / temperature) cut to top-p."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DraftsmithError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DraftsmithError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities over the last dimension after temperature and top-p (nucleus) filtering.

    Drafters that sample should draw from ``warp(their_logits, same_sampling)`` so that p and q are shaped
    the same way; the acceptance rule stays lossless for any q they report, though.
    """
    if sampling.greedy:
        raise ValueError("warp() is for sampling; greedy decoding uses argmax")
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep a token while the mass strictly before it is below top_p: the smallest set reaching top_p
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)
