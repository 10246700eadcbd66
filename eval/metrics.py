"""The evaluation metrics, defined once (docs/design.md) and shared with training.

A step is one verification forward of the target (the prefill forward is not a step). Per step we record
``appended`` tokens (accepted draft tokens + the target's bonus token), ``accepted`` and ``offered`` draft
tokens (see `eval.acceptance.Verdict`).
"""

from __future__ import annotations

from collections.abc import Sequence


def tau(appended: Sequence[int]) -> float:
    """Mean tokens appended per target forward, pooled over steps (plain decoding = 1.0)."""
    return sum(appended) / len(appended) if appended else 0.0


def tau_per_question(appended_per_question: Sequence[Sequence[int]]) -> list[float]:
    return [tau(steps) for steps in appended_per_question]


def alpha(accepted: Sequence[int], offered: Sequence[int], max_k: int | None = None) -> list[float]:
    """alpha_k = P(draft token k accepted | tokens 1..k-1 accepted), k = 1, 2, ...

    The denominator counts steps where a k-th token was on offer after k-1 acceptances."""
    if len(accepted) != len(offered):
        raise ValueError("accepted and offered must have one entry per step")
    deepest = max(offered, default=0) if max_k is None else max_k
    values = []
    for k in range(1, deepest + 1):
        trials = sum(1 for o in offered if o >= k)
        if trials == 0:
            break
        values.append(sum(1 for a in accepted if a >= k) / trials)
    return values


def chain_tau(top1_accuracy: Sequence[float]) -> float:
    """Expected tau of a greedy chain from per-position top-1 accuracies: 1 + sum_k prod_{j<=k} acc_j.

    Training's estimate of the tau the evaluator will measure; the leading 1 is the target's bonus token."""
    expected, survive = 1.0, 1.0
    for acc in top1_accuracy:
        survive *= min(max(float(acc), 0.0), 1.0)
        expected += survive
    return expected


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def speedup(plain_tokens: int, plain_s: float, spec_tokens: int, spec_s: float) -> float:
    """Ratio of wall-clock tokens per second, speculative over plain, measured in the same run."""
    plain = tokens_per_s(plain_tokens, plain_s)
    return tokens_per_s(spec_tokens, spec_s) / plain if plain > 0 else 0.0
