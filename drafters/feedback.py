"""How much of a drafter's previous chain the target kept, read off the verified sequence.

Adaptive training-free drafters use it to tune themselves without any extra channel from the engine:
the tokens appended since the last `propose` are the accepted draft prefix followed by the bonus token.
"""

from __future__ import annotations

import torch


class ChainFeedback:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.draft: list[int] = []
        self.length = 0

    def remember(self, draft: list[int], tokens: torch.Tensor) -> None:
        """Record a chain just proposed below the last token of ``tokens``."""
        self.draft, self.length = list(draft), tokens.numel()

    def accepted(self, tokens: torch.Tensor) -> int | None:
        """Draft tokens accepted last time, or None when nothing was proposed (or the sequence changed)."""
        if not self.draft or tokens.numel() <= self.length:
            return None
        new = tokens[self.length :].tolist()[:-1]  # the last new token is the target's bonus
        count = 0
        for drafted, kept in zip(self.draft, new):
            if drafted != kept:
                break
            count += 1
        return count
