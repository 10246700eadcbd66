"""Speculative-decoding evaluator: engine, verification, training-free drafters, metrics, reports, CLI."""

from __future__ import annotations

from typing import Any

__all__ = ["load_drafter"]


def __getattr__(name: str) -> Any:
    # lazy, so `import eval.metrics` (used by training) does not load the drafters and plotting stack
    if name == "load_drafter":
        from draftsmith.eval.loading import load_drafter

        return load_drafter
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
