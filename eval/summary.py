"""From per-question result rows to the ``summary.json`` dict (keys fixed in docs/design.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from draftsmith.eval import metrics


def _aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    appended = [n for row in rows for n in row["accept_lengths"]]
    accepted = [n for row in rows for n in row["accepted"]]
    offered = [n for row in rows for n in row["offered"]]
    plain_tokens = sum(row["plain_new_tokens"] for row in rows)
    plain_s = sum(row["plain_wall_time"] for row in rows)
    spec_tokens = sum(row["new_tokens"] for row in rows)
    spec_s = sum(row["wall_time"] for row in rows)
    checked = [row["lossless"] for row in rows if row["lossless"] is not None]
    identical = [row["identical_turns"] for row in rows if row.get("identical_turns") is not None]
    turns = sum(len(row["turns"]) for row in rows if row.get("identical_turns") is not None)
    return {
        "n_questions": len(rows),
        "tau": metrics.tau(appended),
        "tau_per_question": metrics.tau_per_question([row["accept_lengths"] for row in rows]),
        "alpha": metrics.alpha(accepted, offered),
        "longest_accepted": max(accepted, default=0),  # the most draft tokens one step kept (block drafters' figure)
        "speedup": metrics.speedup(plain_tokens, plain_s, spec_tokens, spec_s),
        "tokens_per_s": {
            "plain": metrics.tokens_per_s(plain_tokens, plain_s),
            "speculative": metrics.tokens_per_s(spec_tokens, spec_s),
        },
        "lossless_mismatches": sum(1 for ok in checked if not ok) if checked else None,
        "match_rate": sum(identical) / turns if turns else None,
    }


def summarize(rows: Sequence[dict[str, Any]], drafter: str, target: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``lossless_mismatches`` counts questions whose greedy speculative output differs from plain greedy
    output (None for sampled runs, where outputs legitimately differ); ``match_rate`` is the share of turns
    answered token for token as plain decoding did: 1.0 when lossless, and the figure to read in bfloat16 or
    float16, where a batched verification rounds differently from a one-token step."""
    categories = sorted({row["category"] for row in rows})
    return {
        "drafter": drafter,
        "target": target,
        **_aggregate(rows),
        "by_category": {c: _aggregate([r for r in rows if r["category"] == c]) for c in categories},
        "settings": settings,
    }
