"""The schema of the training recipes (`recipes/config.yaml` and its groups) as typed, validated dataclasses.

Each dataclass is the one place a key is declared: its type, its default (the group YAMLs state only what
differs), and its checks (`validate`, raising DraftsmithError naming the key). `store_schemas` puts them in
Hydra's ConfigStore, where the YAMLs name them first in their defaults lists (``base_trainer``, ...), so Hydra
rejects an unknown key or a wrong type while composing, naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.phases import Phase, check_phases

STRATEGIES = ("auto", "ddp", "deepspeed")
FEATURE_MODES = ("online", "cache")
KEEP_MODES = ("best", "last")


def _plain(values: Any) -> dict[str, Any]:
    """A Hydra node or any mapping as a plain dict (interpolations resolved)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    return dict(values)


def _known_only(cls: type, values: Mapping[str, Any], group: str) -> dict[str, Any]:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DraftsmithError(f"unknown {group} key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(values)


@dataclass(frozen=True)
class TrainSettings:
    """The `trainer` group (recipes/trainer/*.yaml): everything a training run needs besides the target, the
    drafter and the data. The defaults are one process on the CPU in float32."""

    accelerator: str = "cpu"
    strategy: str = "auto"  # auto | ddp | deepspeed
    zero_stage: int | None = None  # 1, 2 or 3 with strategy=deepspeed
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32"
    max_epochs: int = 1
    max_steps: int = -1  # -1 = run max_epochs
    batch_size: int = 8
    accumulate_grad_batches: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then cosine decay to 0 over the run (per optimizer step)
    grad_clip: float | None = 1.0
    val_fraction: float = 0.05  # held-out share of the distilled conversations (seeded split)
    max_length: int = 512  # tokens per conversation; longer ones are truncated
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100  # also mid-epoch, so resume=true loses at most this many steps
    features: str = "online"  # online = run the frozen target in each step; cache = read data's feature cache
    sort_chunk: int = 64  # batches per chunk whose rows are sorted by length (length bucketing)
    num_workers: int = 0
    # stages of one run (training/phases.py): [{name, epochs, lr, drafter: {...}}]; max_epochs is then their sum
    phases: list[Phase] = field(default_factory=list)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> TrainSettings:
        values = _known_only(cls, _plain(values), "trainer")
        phases = [Phase.from_config(phase) for phase in values.pop("phases", None) or []]
        check_phases(phases)
        if phases:
            values["max_epochs"] = sum(phase.epochs for phase in phases)
        settings = cls(**values, phases=phases)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DraftsmithError(f"trainer.strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.strategy == "deepspeed" and self.zero_stage not in (1, 2, 3):
            raise DraftsmithError("trainer.strategy=deepspeed needs trainer.zero_stage=1, 2 or 3")
        if self.features not in FEATURE_MODES:
            raise DraftsmithError(f"trainer.features={self.features!r}: use one of {', '.join(FEATURE_MODES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DraftsmithError(f"trainer.val_fraction={self.val_fraction}: give a fraction in [0, 1)")
        positive = (
            "devices",
            "num_nodes",
            "batch_size",
            "accumulate_grad_batches",
            "max_length",
            "max_epochs",
            "log_every_n_steps",
            "checkpoint_every_n_steps",
            "sort_chunk",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise DraftsmithError(f"trainer.{name}={getattr(self, name)}: must be at least 1")
        if self.lr <= 0:
            raise DraftsmithError(f"trainer.lr={self.lr}: must be positive")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise DraftsmithError("trainer.warmup_steps, weight_decay and num_workers must not be negative")


@dataclass(frozen=True)
class AcceptanceSettings:
    """The `eval` group (recipes/eval/*.yaml): the acceptance evaluation a training run does after each epoch
    and after export (training/callbacks.py AcceptanceEval)."""

    questions: str | None = None  # Spec-Bench-style JSONL; null = eval/question_sets/mini_specbench.jsonl
    limit: int | None = None  # evaluate this many, taken round-robin over the categories; null = all
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (lossless check on)
    keep: str = "best"  # the export kept: best = the epoch with the highest tau (a tie: the later), last = final
    # the final evaluation's draft size: auto = each step's chosen by the measured cost model (eval/cost_model.py);
    # null = the drafter's own tree (drafter.tree_nodes, the one the export carries). The per-epoch evaluations that
    # pick the kept epoch always use the drafter's own tree, so epochs compare at one shape
    tree_nodes: str | None = "auto"

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> AcceptanceSettings:
        settings = cls(**_known_only(cls, _plain(values), "eval"))
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.keep not in KEEP_MODES:
            raise DraftsmithError(f"eval.keep must be one of {', '.join(KEEP_MODES)}, got {self.keep!r}")
        if self.tree_nodes not in ("auto", None):
            raise DraftsmithError(f"eval.tree_nodes={self.tree_nodes}: use auto, or null for the drafter's own tree")
        if self.limit is not None and self.limit < 1:
            raise DraftsmithError(f"eval.limit={self.limit}: must be at least 1 (or null for all)")
        if self.max_new_tokens < 1:
            raise DraftsmithError(f"eval.max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise DraftsmithError(f"eval.temperature={self.temperature}: must be >= 0 (0 = greedy)")


@dataclass(frozen=True)
class PublishSettings:
    repo_id: str | None = None  # ORG/NAME uploads ${out}/export to the Hub after training
    private: bool = True


@dataclass(frozen=True)
class ExportSettings:
    """What the export folder carries besides draftsmith's own form."""

    # serving-engine forms, each in ${out}/export/engines/NAME: [auto] = every form the drafter kind has
    # (EAGLE-3: speculators, sglang; Medusa-1: vllm), [] = none, or names (drafters/engine_formats.py)
    engines: list[str] = field(default_factory=lambda: ["auto"])


@dataclass(frozen=True)
class RecipeSettings:
    """The primary config's own keys (recipes/config.yaml). Its groups are typed by their own schemas
    (`store_schemas`): the drafter's depends on its kind."""

    target: Any = MISSING
    drafter: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    eval: Any = MISSING
    recipe_name: str = MISSING  # set by each recipe (recipes/recipe/NAME.yaml)
    out: str = "outputs/${recipe_name}"  # everything this run writes; the export lands in ${out}/export
    seed: int = 0
    resume: bool = False  # continue training from ${out}/checkpoints/last.ckpt
    publish: PublishSettings = field(default_factory=PublishSettings)
    export: ExportSettings = field(default_factory=ExportSettings)


def _schema(cls: type) -> Any:
    """``cls`` as a Hydra schema node. A frozen dataclass makes a read-only node, which Hydra could not merge
    the YAML and the command line into: the schema keeps the types and keys, not the immutability."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.structured(cls)

    def writable(config: DictConfig) -> None:
        OmegaConf.set_readonly(config, None)
        for _, child in config.items_ex(resolve=False):
            if isinstance(child, DictConfig) and not child._is_none():  # an optional mapping left null
                writable(child)

    writable(node)
    return node


def drafter_schema(config_class: type) -> type:
    """A drafter kind's config dataclass with its ClassVar ``kind`` as a field (default: the kind), so the
    composed `drafter` group carries ``kind`` the way `pipeline.drafter_config` and exports read it."""
    return dataclasses.make_dataclass(
        f"{config_class.__name__}Schema",
        [("kind", str, field(default=config_class.kind))],
        bases=(config_class,),
    )


def store_schemas() -> None:
    """Store every group's schema in Hydra's ConfigStore: ``base_config`` (the primary config's own keys),
    ``trainer/base_trainer``, ``eval/base_eval``, ``data/base_data``, ``target/base_target`` and
    ``drafter/base_KIND`` for each drafter kind. Idempotent; the CLIs call it before Hydra composes."""
    from hydra.core.config_store import ConfigStore

    import draftsmith.drafters  # noqa: F401 - imports (so registers) every drafter kind
    from draftsmith.data.config import DataConfig
    from draftsmith.drafters.base import drafter_class, drafter_kinds
    from draftsmith.drafters.target import TargetSpec

    store = ConfigStore.instance()
    store.store(name="base_config", node=_schema(RecipeSettings))
    store.store(group="trainer", name="base_trainer", node=_schema(TrainSettings))
    store.store(group="eval", name="base_eval", node=_schema(AcceptanceSettings))
    store.store(group="data", name="base_data", node=_schema(DataConfig))
    store.store(group="target", name="base_target", node=_schema(TargetSpec))
    for kind in drafter_kinds():
        schema = drafter_schema(drafter_class(kind).config_class)
        store.store(group="drafter", name=f"base_{kind}", node=_schema(schema))
