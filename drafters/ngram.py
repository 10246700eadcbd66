"""The ``ngram`` drafter (ANPD-style adaptive n-gram / prompt lookup), training-free.

An n-gram table over the prompt and every verified token maps each n-gram (n = ``max_n`` .. ``min_n``) to
the position right after its most recent occurrence. To draft, look up the sequence's last n tokens,
longest n first, backing off to shorter ones, and propose what followed the match. With ``branches > 1`` the
draft is a small tree: the continuations of the matches at several levels, as sibling alternatives.

With ``adaptive`` the chain length follows acceptance: after a draft was cut at k accepted tokens the next
one has at most k + 1, after a fully accepted one it grows by 2, up to ``draft_len``. Verifying a token
is not free on a CPU, so long drafts of a poor match cost more than they win.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig, register
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.feedback import ChainFeedback


@dataclass
class NgramConfig(DrafterConfig):
    kind: ClassVar[str] = "ngram"
    max_n: int = 4
    min_n: int = 1
    draft_len: int = 10
    branches: int = 1
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise DraftsmithError(f"ngram needs 1 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")
        if self.draft_len < 1 or self.branches < 1:
            raise DraftsmithError("ngram draft_len and branches must be >= 1")


@register
class NgramDrafter(Drafter):
    config_class = NgramConfig

    def __init__(self, config: NgramConfig | None = None) -> None:
        super().__init__(config or NgramConfig())
        self.reset()

    def reset(self) -> None:
        self.feedback = ChainFeedback()
        self.limit = self.config.draft_len
        self._tokens: list[int] = []
        self._tables: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(self.config.min_n, self.config.max_n + 1)
        }

    def _extend(self, tokens: torch.Tensor) -> None:
        """Index every n-gram whose continuation is known (those ending before the last token)."""
        if len(tokens) < len(self._tokens) or tokens[: len(self._tokens)].tolist() != self._tokens:
            self.reset()  # a different sequence than the one indexed so far
        known = len(self._tokens)
        self._tokens.extend(tokens[known:].tolist())
        seq = self._tokens
        for end in range(max(known, 1), len(seq)):
            for n, table in self._tables.items():
                if end >= n:
                    table[tuple(seq[end - n : end])] = end

    def _continuations(self) -> list[list[int]]:
        """Distinct continuations of the matches, longest n-gram first."""
        seq, found = self._tokens, []
        for n in range(self.config.max_n, self.config.min_n - 1, -1):
            if len(seq) < n:
                continue
            start = self._tables[n].get(tuple(seq[-n:]))
            if start is None:
                continue
            continuation = seq[start : start + self.limit]
            if continuation and all(c[0] != continuation[0] for c in found):
                found.append(continuation)
            if len(found) == self.config.branches:
                break
        return found

    def _adapt(self, tokens: torch.Tensor) -> None:
        accepted = self.feedback.accepted(tokens)
        if not self.config.adaptive or accepted is None:
            return
        grown = self.limit + 2 if accepted == len(self.feedback.draft) else accepted + 1
        self.limit = max(1, min(self.config.draft_len, grown))

    def set_draft_size(self, nodes: int) -> None:
        """At most ``nodes`` draft tokens per step: each of the ``branches`` continuations gets an equal share."""
        self.config.draft_len = max(1, nodes // self.config.branches)
        self.limit = min(self.limit, self.config.draft_len)

    def draft_shape(self) -> dict[str, Any]:
        return {"draft_len": self.config.draft_len, "branches": self.config.branches}

    def propose(self, state: DecodeState) -> Draft:
        self._adapt(state.tokens)
        self._extend(state.tokens)
        tokens: list[int] = []
        parents: list[int] = []
        continuations = self._continuations()
        for continuation in continuations:
            parent = -1
            for token in continuation:
                parents.append(parent)
                parent = len(tokens)
                tokens.append(token)
        self.feedback.remember(continuations[0] if continuations else [], state.tokens)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))
