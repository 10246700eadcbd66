"""DiffuSpec's two training-free decoding aids for a drafter that scores k positions in one pass (DEER).

Causal-consistency path search. A one-step diffusion draft gives a distribution per position, each computed
without seeing the tokens chosen at the others, so the per-position argmaxes need not read as one text. The
search keeps, per position, the most likely tokens up to ``mass`` cumulative probability (at most ``width``), cuts
the lattice after the first position whose most likely token ends the sequence, and runs a left-to-right beam
search scoring each path by ``weight * log q + (1 - weight) * log p_ngram``: q the drafter's per-position
probability, p_ngram a causal proxy, the n-gram model of the prompt and the output so far (`NgramProxy`). A path
never continues past an end-of-sequence token, so such a candidate is kept only at the lattice's last position.

Adaptive draft length (`LengthController`): exponential moving averages of the drafted and the accepted lengths;
the next length is ``clip(round(drafted) + step * [accepted >= drafted], low, high)``: it grows while drafts are
accepted whole and otherwise follows what was drafted (which the end-of-sequence cut shortens). Both as DiffuSpec
states them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def lattice(probs: torch.Tensor, mass: float, width: int, eos_ids: set[int]) -> list[list[tuple[int, float]]]:
    """Per position of ``probs [k, V]``, the (token, log q) pairs kept: most likely first, until their mass reaches
    ``mass`` (at least one, at most ``width``); positions after the first whose most likely token is an
    end-of-sequence token are dropped."""
    top_probs, top_tokens = probs.float().topk(min(width, probs.shape[-1]), dim=-1)
    before = top_probs.cumsum(-1) - top_probs  # the mass of the candidates ranked above each one
    positions = []
    for row_probs, row_tokens, row_before in zip(top_probs.tolist(), top_tokens.tolist(), before.tolist()):
        kept = [(t, math.log(max(p, 1e-30))) for t, p, b in zip(row_tokens, row_probs, row_before) if b < mass]
        positions.append(kept)
        if kept[0][0] in eos_ids:
            break
    return positions


class NgramProxy:
    """An n-gram model of one sequence (prompt and output so far), smoothed by interpolation: p_n(x | h) =
    (c(h, x) + prior * p_{n-1}(x | h')) / (c(h) + prior), down to the uniform distribution over ``vocab``; an
    unseen history h falls back to the order below. Tokens are only ever appended, so counting is incremental."""

    def __init__(self, order: int, vocab: int, prior: float) -> None:
        self.order, self.vocab, self.prior = order, vocab, prior
        self.clear()

    def clear(self) -> None:
        self.counts: list[dict[tuple[int, ...], dict[int, int]]] = [defaultdict(dict) for _ in range(self.order)]
        self.totals: list[dict[tuple[int, ...], int]] = [defaultdict(int) for _ in range(self.order)]
        self.seen: list[int] = []

    def update(self, tokens: list[int]) -> None:
        """Count ``tokens``, the sequence so far: what extends the sequence already counted, or all of it anew."""
        if tokens[: len(self.seen)] != self.seen:
            self.clear()
        for i in range(len(self.seen), len(tokens)):
            for n in range(min(self.order, i + 1)):
                history = tuple(tokens[i - n : i])
                row = self.counts[n][history]
                row[tokens[i]] = row.get(tokens[i], 0) + 1
                self.totals[n][history] += 1
        self.seen = list(tokens)

    def log_prob(self, history: list[int], token: int) -> float:
        p = 1.0 / self.vocab
        for n in range(min(self.order, len(history) + 1)):
            key = tuple(history[len(history) - n :])
            total = self.totals[n].get(key, 0)
            if total:
                p = (self.counts[n][key].get(token, 0) + self.prior * p) / (total + self.prior)
        return math.log(p)


def path_search(
    positions: list[list[tuple[int, float]]],
    proxy: NgramProxy,
    context: list[int],
    beam: int,
    weight: float,
    eos_ids: set[int],
) -> list[int]:
    """The best-scoring left-to-right path through the lattice (see the module docstring)."""
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    last = len(positions) - 1
    for index, candidates in enumerate(positions):
        grown = []
        for score, path in beams:
            history = context + path
            for token, log_q in candidates:
                if token in eos_ids and index < last:
                    continue
                value = weight * log_q + (1.0 - weight) * proxy.log_prob(history, token)
                grown.append((score + value, [*path, token]))
        if not grown:  # only end-of-sequence candidates here: the paths so far are the draft
            break
        beams = sorted(grown, key=lambda item: -item[0])[:beam]
    return beams[0][1]


class LengthController:
    """DiffuSpec's adaptive draft length (see the module docstring); starts at ``low``."""

    def __init__(self, low: int, high: int, step: int, rho: float) -> None:
        self.low, self.high, self.step, self.rho = low, high, step, rho
        self.drafted: float | None = None
        self.accepted = 0.0
        self.length = low

    def update(self, drafted: int, accepted: int) -> int:
        """Take the last draft's drafted and accepted lengths; return the next draft length."""
        if self.drafted is None:
            self.drafted, self.accepted = float(drafted), float(accepted)
        else:
            self.drafted = self.rho * self.drafted + (1 - self.rho) * drafted
            self.accepted = self.rho * self.accepted + (1 - self.rho) * accepted
        grow = self.step if self.accepted >= self.drafted else 0
        self.length = min(max(round(self.drafted) + grow, self.low), self.high)
        return self.length
