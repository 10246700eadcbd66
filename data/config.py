"""The `data` config group (recipes/data/*.yaml) as typed, validated dataclasses: its schema.

Each key's type and default are declared here once (the group YAMLs state only what differs); a mistyped key or
an impossible value ends in one DraftsmithError naming the key, before any model runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from draftsmith.drafters.errors import DraftsmithError

CACHE_IMPLEMENTATIONS = ("static", "dynamic")
# data.synth.domain names one of these mixes, or gives its own: weights over the base domains (data/synth.py STEERS)
DOMAIN_MIXES: dict[str, dict[str, float]] = {
    "general": {"general": 1.0},
    "code": {"code": 1.0},
    "math": {"math": 1.0},
    "code_math": {"code": 1.0, "math": 1.0},
}
BASE_DOMAINS = ("general", "code", "math")
ENGINES = ("transformers", "vllm")


def _plain(values: Any) -> Any:
    """An OmegaConf DictConfig (from Hydra) or any Mapping, as plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(values, DictConfig | ListConfig):
            return OmegaConf.to_container(values, resolve=True)
    except ImportError:
        pass
    return values


def _build(cls: type, values: Any, where: str) -> Any:
    values = _plain(values)
    if not isinstance(values, Mapping):
        raise DraftsmithError(f"{where} must be a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DraftsmithError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {', '.join(fields)}"
        )
    return cls(**dict(values))


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise DraftsmithError(f"data.{key} must be {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SynthConfig:
    """Magpie-style prompt synthesis: the target writes user prompts from its chat template alone."""

    n: int = 400  # prompts to synthesize (deduplicated)
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 48
    batch_size: int = 32  # prompts sampled per generate call
    # what the prompts are about: general | code | math | code_math, or weights such as {general: 4, code: 1, math: 1}
    # (n is split by them; each domain is its own cached stream, general's the same as before domains existed)
    domain: Any = "general"

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n > 0, "synth.n", "a positive integer", self.n)
        if isinstance(self.domain, Mapping):
            object.__setattr__(self, "domain", dict(_plain(self.domain)))
        mix = self.domain if isinstance(self.domain, dict) else DOMAIN_MIXES.get(str(self.domain))
        _check(
            bool(mix)
            and set(mix) <= set(BASE_DOMAINS)
            and all(isinstance(w, int | float) and not isinstance(w, bool) and w > 0 for w in mix.values()),
            "synth.domain",
            f"one of {', '.join(DOMAIN_MIXES)}, or positive weights over {', '.join(BASE_DOMAINS)}",
            self.domain,
        )
        _check(
            isinstance(self.temperature, int | float) and self.temperature > 0,
            "synth.temperature",
            "> 0 (synthesis samples)",
            self.temperature,
        )
        _check(isinstance(self.top_p, int | float) and 0 < self.top_p <= 1, "synth.top_p", "in (0, 1]", self.top_p)
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens > 0,
            "synth.max_new_tokens",
            "a positive integer",
            self.max_new_tokens,
        )
        _check(
            _is_int(self.batch_size) and self.batch_size > 0, "synth.batch_size", "a positive integer", self.batch_size
        )

    @property
    def weights(self) -> dict[str, float]:
        """``domain`` as weights over the base domains, in the order given."""
        mix = self.domain if isinstance(self.domain, dict) else DOMAIN_MIXES[self.domain]
        return {name: float(weight) for name, weight in mix.items()}


@dataclass(frozen=True)
class UnseenConfig:
    """Synthesized prompts the data leaves out (the ``count`` after the ``synth.n`` it uses), written to
    ``out`` as an eval question file: a held-out set from the same generator as the training prompts."""

    count: int = 32
    out: str | None = None  # a JSONL path writes them there as an eval question file (`python -m eval questions=...`)

    def __post_init__(self) -> None:
        _check(_is_int(self.count) and self.count > 0, "unseen.count", "a positive integer", self.count)
        _check(
            self.out is None or (isinstance(self.out, str) and bool(self.out)), "unseen.out", "null or a path", self.out
        )


@dataclass(frozen=True)
class FeaturesConfig:
    """Optional cache of target hidden states / top-k log-probs beside the data."""

    enabled: bool = False  # cache target hidden states / top-k log-probs beside the data
    layers: tuple[int, ...] = (-1,)
    topk: int = 0

    def __post_init__(self) -> None:
        layers = self.layers if isinstance(self.layers, list | tuple) else [self.layers]
        _check(all(_is_int(x) for x in layers), "features.layers", "a list of layer indices", self.layers)
        object.__setattr__(self, "layers", tuple(layers))
        _check(_is_int(self.topk) and self.topk >= 0, "features.topk", "an integer >= 0", self.topk)


@dataclass(frozen=True)
class DataConfig:
    """Everything `build_distilled` reads. ``generation()`` is the part that decides the answers.

    The defaults distill the embedded target's own synthesized prompts (Magpie-style, offline), answered by
    the same target greedily; sized for a 2-core CPU."""

    # "synth", a JSONL file (Spec-Bench `turns` or ShareGPT `conversations`), or a datasets name/folder; null
    # (the ShareGPT recipes): not given yet, pass data.prompts=PATH
    prompts: str | None = "synth"
    split: str = "train"  # for a datasets source
    synth: SynthConfig = field(default_factory=SynthConfig)
    limit: int | None = None  # use at most this many conversations
    max_new_tokens: int = 128  # per assistant turn
    temperature: float = 0.0  # 0 = greedy regeneration
    top_p: float = 1.0
    seed: int = 0  # seeds synthesis and sampled regeneration (per shard, so a resumed run gives the same rows)
    system_prompt: str | None = None  # null = the chat template's default system prompt
    chat_template: str | None = None  # null = the tokenizer's own; "vicuna" or a Jinja template for one without
    batch_size: int = 32
    shard_rows: int = 64  # rows per shard: the unit of resume
    cache_implementation: str = "static"  # KV cache of the regeneration's generate calls: static or dynamic
    engine: str = "transformers"  # what regenerates: transformers' generate, or vLLM's LLM.generate (needs vllm)
    out: str | None = None  # null = shared cache, keyed by target, prompts and generation settings
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    unseen: UnseenConfig = field(default_factory=UnseenConfig)  # held-out prompts: the `count` after the n used

    def __post_init__(self) -> None:
        if not isinstance(self.synth, SynthConfig):
            object.__setattr__(self, "synth", _build(SynthConfig, self.synth, "data.synth"))
        if not isinstance(self.unseen, UnseenConfig):
            object.__setattr__(self, "unseen", _build(UnseenConfig, self.unseen, "data.unseen"))
        if not isinstance(self.features, FeaturesConfig):
            object.__setattr__(self, "features", _build(FeaturesConfig, self.features, "data.features"))
        _check(
            isinstance(self.prompts, str) and bool(self.prompts),
            "prompts",
            '"synth", a JSONL/JSON file, or a datasets name or folder',
            self.prompts,
        )
        _check(
            self.unseen.out is None or self.prompts == "synth",
            "unseen.out",
            'null unless data.prompts is "synth" (hold questions out of a prompt file yourself)',
            self.unseen.out,
        )
        _check(self.limit is None or (_is_int(self.limit) and self.limit > 0), "limit", "null or > 0", self.limit)
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens > 0,
            "max_new_tokens",
            "a positive integer",
            self.max_new_tokens,
        )
        _check(
            isinstance(self.temperature, int | float) and self.temperature >= 0,
            "temperature",
            ">= 0 (0 = greedy)",
            self.temperature,
        )
        _check(isinstance(self.top_p, int | float) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.seed), "seed", "an integer", self.seed)
        _check(
            self.system_prompt is None or isinstance(self.system_prompt, str),
            "system_prompt",
            "null (the template's default) or a string",
            self.system_prompt,
        )
        _check(
            self.chat_template is None or isinstance(self.chat_template, str),
            "chat_template",
            "null (the tokenizer's own), a template name or a Jinja template",
            self.chat_template,
        )
        _check(_is_int(self.batch_size) and self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        _check(_is_int(self.shard_rows) and self.shard_rows > 0, "shard_rows", "a positive integer", self.shard_rows)
        _check(
            self.cache_implementation in CACHE_IMPLEMENTATIONS,
            "cache_implementation",
            " or ".join(CACHE_IMPLEMENTATIONS),
            self.cache_implementation,
        )
        _check(self.engine in ENGINES, "engine", " or ".join(ENGINES), self.engine)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | DataConfig) -> DataConfig:
        if isinstance(values, DataConfig):
            return values
        return _build(cls, values, "data")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation(self) -> dict[str, Any]:
        """The settings that decide what the target writes: part of the manifest and of the cache key."""
        settings: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "greedy": self.greedy,
            "system_prompt": self.system_prompt,
        }
        if self.engine != "transformers":
            # Another engine's kernels may round differently, so its rows are their own data set; the default
            # engine adds no key, so folders written before the key existed keep their cache key.
            settings["engine"] = self.engine
        if not self.greedy:
            # Sampled answers depend on the random stream, which is seeded per shard and consumed per batch.
            settings.update(
                temperature=float(self.temperature),
                top_p=float(self.top_p),
                seed=self.seed,
                shard_rows=self.shard_rows,
                batch_size=self.batch_size,
            )
        return settings
