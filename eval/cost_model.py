"""The measured cost model of the hardware at hand, and the draft shape it picks (``tree_nodes=auto``).

Cost. One verification of q rows (the root + q - 1 draft nodes) is timed through the engine's own step
(`SpeculativeDecoder.generate` with a drafter proposing q - 1 random tokens: tree layout, the target forward
over the whole rollback cache, acceptance, compaction), for q on `PROFILE_ROWS` at a few cache sizes
(`PROFILE_CONTEXTS`), median of a few steps. Such a curve is neither linear nor monotonic on a CPU and differs
by dtype, so it is measured, never assumed, and cached per (target identity, device, dtype, threads) as JSON
under ``<cache>/cost/``. A drafter's own cost per proposal is measured the same way and kept beside it.

Shape. `DraftShaper` picks, before every step, the draft size n that maximises expected tokens per second,
``E[appended | n] / (t_draft [n > 0] + t_verify(n + 1))``, n = 0 (a plain step: the drafter is not even asked)
included (a draft only when it promises `DRAFT_MARGIN` more than a plain step: the predictions' own error),
so when no draft pays decoding costs what plain decoding costs, plus one probe every
`PROBE_EVERY` plain steps that keeps the acceptance estimate current. E comes from:

- a drafter with a trained acceptance model (`AdaptiveTree`: Medusa, Amphista, ParallelSpec): Sequoia-style
  sizing over nested greedy trees. Under head independence the best n-node tree holds the n most valuable
  rank paths (value = product of per-rank accuracies along the path; `drafters.rank_trees.greedy_nodes`
  adds them by decreasing marginal gain), so E[n] = 1 + the sum of the first n gains, and the size search
  is exact over that family. The per-rank accuracies are the ones measured in training, refined online by
  the acceptance seen while decoding (`TreeMixin.observe_acceptance`, a Beta-style blend);
- any other drafter: its own draft is cut to its first n nodes (topological order) and read as a chain:
  E[n] = 1 + sum_k<=n prod_j<=k alpha_j, with alpha_k the acceptance of draft position k given k - 1 accepted
  observed so far (the alpha_k of the reports; a uniform Beta(1, 1) prior on each before any).

Both times are refined online too: t_draft is an exponential average of the drafter's measured time, and
t_verify the profiled curve times two exponential averages of measured over predicted step time: one over every
step (the machine's load drifts; it moves the whole curve) and, for each verified size seen, that size's own
ratio to the first (a profile taken in isolation can misjudge what a size costs inside real decoding: 2 rows
profiled as cheap as 1 may cost more once a drafter runs between the steps).
"""

from __future__ import annotations

import bisect
import json
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target, cache_root
from draftsmith.eval.acceptance import Verdict
from draftsmith.eval.engine import SpeculativeDecoder, StepRecord

PROFILE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PROFILE_CONTEXTS = (128, 384, 1024)
PROFILE_REPEATS = 7
PROBE_EVERY = 64  # plain steps between two probes of the best draft, when no draft pays
REPLAN_EVERY = 8  # steps between two recomputations of E[appended | n] from the refined acceptance
SMOOTHING = 0.1  # weight of the newest measurement in the online time estimates
# A draft must promise this much more than a plain step: predicted tokens/s of drafted shapes ran 4-20% above the
# measured ones on a 2-core CPU (`make bench-cost`), so a draft predicted to win by less is a coin toss that
# costs its drafter's time.
DRAFT_MARGIN = 1.05
COST_FORMAT = "draftsmith-cost"


@dataclass
class CostModel:
    """Seconds of one verification step per (cache capacity, rows), and per-proposal drafter costs by name."""

    key: dict[str, Any]
    rows: list[int]
    capacities: list[int]
    verify_s: list[list[float]]  # [capacity][rows]
    drafter_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape_ok = len(self.verify_s) == len(self.capacities) and all(len(r) == len(self.rows) for r in self.verify_s)
        if not self.rows or not self.capacities or not shape_ok:
            raise DraftsmithError("a cost model needs verify_s[capacity][rows] for every capacity and row count")
        if any(t <= 0 for line in self.verify_s for t in line):
            raise DraftsmithError("a cost model's step times must be positive")

    def verify(self, rows: int, capacity: int) -> float:
        """Predicted seconds of a step verifying ``rows`` rows over a ``capacity``-slot cache: piecewise linear in
        both (the curve is measured at few points; see `_interpolate` past its ends)."""
        by_capacity = [_interpolate(self.rows, line, rows) for line in self.verify_s]
        return _interpolate(self.capacities, by_capacity, capacity)

    def to_dict(self) -> dict[str, Any]:
        return {"format": COST_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CostModel:
        names = ("key", "rows", "capacities", "verify_s", "drafter_s")
        if values.get("format") != COST_FORMAT or any(name not in values for name in names):
            raise DraftsmithError("not a draftsmith cost model")
        return cls(**{name: values[name] for name in names})


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through the points; the first value before them, and after them the last segment's rise
    (a cost never falls past what was measured)."""
    if len(xs) == 1 or x <= xs[0]:
        return float(ys[0])
    i = min(bisect.bisect_right(xs, x) - 1, len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    if x > xs[-1]:
        return float(ys[-1] + max(slope, 0.0) * (x - xs[-1]))
    return float(ys[i] + slope * (x - xs[i]))


def cost_key(model: PreTrainedModel, target: Target) -> dict[str, Any]:
    """What a measured curve holds for: the target's identity, device, dtype and torch's CPU threads."""
    parameter = next(model.parameters())
    return {
        "target": target.identity.name,
        "weights_hash": target.identity.weights_hash,
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def cost_path(key: dict[str, Any]) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{key['target']}-{str(key['weights_hash'])[:12]}")
    return cache_root() / "cost" / f"{name}-{key['device'].replace(':', '')}-{key['dtype']}-t{key['threads']}.json"


def load_cost(path: Path) -> CostModel | None:
    """The cached cost model at ``path``, or None when there is none or it cannot be read (it is measured again)."""
    try:
        return CostModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, DraftsmithError, TypeError):
        return None


def save_cost(cost: CostModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(cost.to_dict(), indent=2) + "\n")
    partial.replace(path)
    return path


@dataclass
class ProbeConfig(DrafterConfig):
    kind: ClassVar[str] = "cost-probe"
    nodes: int = 1
    room: int = 1
    vocab_size: int = 2


class ProbeDrafter(Drafter):
    """A chain of ``nodes`` random tokens every step: a verification of ``nodes + 1`` rows, almost always
    rejected. ``room`` fixes the draft room it declares, so every row count is timed over the same cache.
    Not registered: a measuring instrument, not a drafter kind."""

    config_class = ProbeConfig

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__(config)
        self.rng = torch.Generator().manual_seed(0)

    def max_draft_nodes(self) -> int:
        return self.config.room

    def propose(self, state: DecodeState) -> Draft:
        return Draft.chain(torch.randint(0, self.config.vocab_size, (self.config.nodes,), generator=self.rng))


def step_seconds(steps: Sequence[StepRecord], attribute: str) -> float:
    """Median of one per-step time, the first (warm-up) step left out when there are others."""
    values = [getattr(step, attribute) for step in (steps[1:] if len(steps) > 1 else steps)]
    return statistics.median(values) if values else 0.0


def profile_target(
    model: PreTrainedModel,
    key: dict[str, Any],
    rows: Sequence[int] = PROFILE_ROWS,
    contexts: Sequence[int] = PROFILE_CONTEXTS,
    repeats: int = PROFILE_REPEATS,
) -> CostModel:
    """Time the engine's verification step for every row count at every context length (see module docstring)."""
    if min(rows) < 1 or min(contexts) < 1 or repeats < 1:
        raise DraftsmithError("profile rows, contexts and repeats must be at least 1")
    vocab = int(model.config.vocab_size)
    # a cache never holds more positions than the model has: contexts are cut to leave the draft its room
    limit = int(getattr(model.config, "max_position_embeddings", None) or max(contexts) + max(rows) + repeats + 3)
    contexts = sorted({max(min(c, limit - max(rows) - repeats - 3), 1) for c in contexts})
    decoder = SpeculativeDecoder(model, eos_ids=set(), max_draft_nodes=max(rows))
    prompt = torch.randint(0, vocab, (max(contexts),), generator=torch.Generator().manual_seed(0))
    capacities, table = [], []
    for context in contexts:
        line = []
        for q in rows:
            probe = ProbeDrafter(ProbeConfig(nodes=q - 1, room=max(rows) - 1, vocab_size=vocab))
            generation = decoder.generate(prompt[:context], probe, max_new_tokens=repeats + 1)
            line.append(step_seconds(generation.steps, "verify_s"))
        capacities.append(decoder.cache.capacity)
        table.append(line)
    return CostModel(key=key, rows=list(rows), capacities=capacities, verify_s=table)


def profile_drafter(
    model: PreTrainedModel, drafter: Drafter, prompt: Sequence[int], steps: int = PROFILE_REPEATS
) -> float:
    """Median seconds per proposal of ``drafter`` decoding ``prompt`` through the engine."""
    generation = SpeculativeDecoder(model, eos_ids=set()).generate(list(prompt), drafter, max_new_tokens=steps + 1)
    return step_seconds(generation.steps, "draft_s")


def measured_cost(target: Target, refresh: bool = False) -> tuple[CostModel, Path]:
    """The cached cost model of ``target`` on this device, dtype and thread count; measured (and cached) when
    there is none yet or ``refresh``."""
    key = cost_key(target.model, target)
    path = cost_path(key)
    cached = None if refresh else load_cost(path)
    if cached is not None and cached.key == key:
        return cached, path
    cost = profile_target(target.model, key)
    if cached is not None:
        cost.drafter_s = dict(cached.drafter_s)
    try:
        save_cost(cost, path)
    except OSError as err:
        raise DraftsmithError(
            f"cannot write the cost model {path} ({err.strerror or err}): set DRAFTSMITH_CACHE to a folder you can "
            "write to"
        ) from None
    return cost, path


@runtime_checkable
class AdaptiveTree(Protocol):
    """A drafter with a trained acceptance model of its trees (`drafters.rank_trees.TreeMixin`)."""

    def forget_acceptance(self) -> None: ...

    def observe_acceptance(self, accepted: Sequence[int]) -> None: ...

    def expected_appended(self, max_nodes: int) -> list[float]: ...

    def shape_draft(self, nodes: int | None) -> None: ...


class DraftShaper:
    """The engine's `DraftPlanner` for ``tree_nodes=auto`` (algorithm: module docstring). One shaper spans a
    whole evaluation, so what it learns carries from question to question; `finish` puts the drafter back."""

    def __init__(
        self, drafter: Drafter, cost: CostModel, drafter_s: float | None = None, max_nodes: int = 64
    ) -> None:
        self.drafter = drafter
        self.cost = cost
        self.tree = drafter if isinstance(drafter, AdaptiveTree) else None
        declared = drafter.max_draft_nodes()
        max_nodes = min(max_nodes, max(cost.rows) - 1)  # no size past the measured curve
        self.max_nodes = max_nodes if self.tree is not None or declared is None else min(declared, max_nodes)
        self.position_hits = [0] * self.max_nodes
        self.position_offered = [0] * self.max_nodes
        self.draft_s = drafter_s
        self.scale = 1.0
        self.size_scale: dict[int, float] = {}  # verified rows -> their measured / (profiled x scale), once seen
        self.capacity = 0
        self.curve: list[float] = []  # t_verify(n + 1) at self.capacity for every size n: a cache grows rarely
        self.planned = 0
        self.shaped: int | None = None
        self.plain_run = 0
        self.replan_in = 0
        self.expected: list[float] = [1.0]
        self.chosen: Counter[int] = Counter()
        if self.tree is not None:
            self.tree.forget_acceptance()

    def _expected(self) -> list[float]:
        if self.tree is not None:
            return self.tree.expected_appended(self.max_nodes)
        expected, survive = [1.0], 1.0
        for hits, offered in zip(self.position_hits, self.position_offered, strict=True):
            survive *= (hits + 1.0) / (offered + 2.0)
            expected.append(expected[-1] + survive)
        return expected

    def verify_s(self, rows: int) -> float:
        """The profiled seconds of verifying ``rows`` rows at the current cache size."""
        return self.curve[rows - 1] if rows <= len(self.curve) else self.cost.verify(rows, self.capacity)

    def step_cost(self, nodes: int) -> float:
        """Predicted seconds of a step drafting ``nodes`` nodes (0 = plain: no drafter call)."""
        drafting = (self.draft_s or 0.0) if nodes > 0 else 0.0
        return drafting + self.scale * self.size_scale.get(nodes + 1, 1.0) * self.verify_s(nodes + 1)

    def best_size(self, drafting: bool = False) -> int:
        """The size with the highest expected tokens per second (the smaller on a tie), 0 unless it beats a plain
        step by `DRAFT_MARGIN`; ``drafting``: n > 0 only."""
        def rate(n: int) -> float:
            return self.expected[n] / self.step_cost(n)

        best = max(range(1, len(self.expected)), key=lambda n: (rate(n), -n), default=0)
        if drafting or best == 0:
            return best
        return best if rate(best) > DRAFT_MARGIN * rate(0) else 0

    def plan(self, capacity: int) -> int:
        if self.replan_in <= 0:
            self.expected = self._expected()
            self.replan_in = REPLAN_EVERY
            self.shaped = None  # the refined acceptance may rank the nodes differently: rebuild the tree
        self.replan_in -= 1
        if capacity != self.capacity:
            self.capacity = capacity
            self.curve = [self.cost.verify(rows, capacity) for rows in range(1, self.max_nodes + 2)]
        nodes = self.best_size()
        self.plain_run = self.plain_run + 1 if nodes == 0 else 0
        if self.plain_run >= PROBE_EVERY:
            nodes, self.plain_run = self.best_size(drafting=True), 0
        if self.tree is not None and nodes > 0 and nodes != self.shaped:
            self.tree.shape_draft(nodes)
            self.shaped = nodes
        self.planned = nodes
        self.chosen[nodes] += 1
        return nodes

    def observe(self, verdict: Verdict, record: StepRecord) -> None:
        measured = record.verify_s / self.verify_s(record.rows)
        self.scale += SMOOTHING * (measured - self.scale)
        size = self.size_scale.get(record.rows, measured / self.scale)
        self.size_scale[record.rows] = size + SMOOTHING * (measured / self.scale - size)
        if self.planned == 0:
            return
        if self.draft_s is None:
            self.draft_s = record.draft_s
        self.draft_s += SMOOTHING * (record.draft_s - self.draft_s)
        if self.tree is not None:
            self.tree.observe_acceptance(verdict.path)
            return
        for position in range(min(record.offered, self.max_nodes)):
            self.position_offered[position] += 1
            self.position_hits[position] += int(position < record.accepted)

    def finish(self) -> None:
        """Give the drafter its own tree back (an export keeps the tree it was trained with)."""
        if self.tree is not None:
            self.tree.shape_draft(None)
            self.shaped = None

    def summary(self, path: Path | None = None) -> dict[str, Any]:
        """What reports record: the sizes chosen (steps per node count), the estimates the choice ended with and
        the cost model behind it."""
        steps = sum(self.chosen.values())
        capacity = self.capacity or self.cost.capacities[0]
        return {
            "tree_nodes": "auto",
            "chosen_nodes": {str(n): count for n, count in sorted(self.chosen.items())},
            "most_chosen_nodes": self.chosen.most_common(1)[0][0] if steps else None,
            "plain_step_share": self.chosen[0] / steps if steps else None,
            "drafter_ms": None if self.draft_s is None else 1000 * self.draft_s,
            "verify_scale": self.scale,
            "size_scale": {str(rows): round(value, 3) for rows, value in sorted(self.size_scale.items())},
            "cost_model": {
                **self.cost.key,
                "file": None if path is None else str(path),
                "plain_step_ms": 1000 * self.cost.verify(1, capacity),
                "rows": self.cost.rows,
                "relative_to_plain": [
                    round(self.cost.verify(q, capacity) / self.cost.verify(1, capacity), 3) for q in self.cost.rows
                ],
            },
        }


def cost_table(cost: CostModel) -> str:
    """The curve as a text table: per row count, milliseconds and the ratio to a plain step, per cache size."""
    header = "rows | " + " | ".join(f"ms @{c} | x plain" for c in cost.capacities)
    lines = [f"cost model: {cost.key}", header]
    for i, q in enumerate(cost.rows):
        cells = [f"{1000 * line[i]:8.1f} | {line[i] / line[0]:6.2f}" for line in cost.verify_s]
        lines.append(f"{q:4d} | " + " | ".join(cells))
    lines += [f"drafter {name}: {1000 * seconds:.1f} ms per proposal" for name, seconds in cost.drafter_s.items()]
    return "\n".join(lines)
