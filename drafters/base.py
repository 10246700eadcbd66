"""The one Drafter interface every drafter kind implements, and the objects it exchanges.

Decoding contract (the evaluator's engine is the only caller of `propose`):

* The verified sequence is ``state.tokens``; its last token is the *root*: it is verified (the target
  chose it) but has not been fed to the target yet, so the target's KV cache holds ``tokens[:-1]``.
* A `Draft` is a token tree hanging below the root. Node ``i`` has token ``tokens[i]`` and parent
  ``parents[i]`` (``-1`` = the root). Nodes are in topological order (``parents[i] < i``). A chain is a
  tree where ``parents == [-1, 0, 1, ...]``.
* The engine verifies the whole tree in one target forward, appends the accepted path plus the
  target's own bonus token, and calls `propose` again.

Training contract: ``loss(batch, features) -> LossOutput`` where ``features`` holds what ``target_needs()``
asked for, computed by the frozen target either online or from the feature cache. Training and evaluation
read nothing of a drafter but `LossOutput` and the hooks below (`calibrate`, `set_draft_size`, `draft_shape`,
`init_weights`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.sampling import SamplingConfig

if TYPE_CHECKING:
    from draftsmith.drafters.target import Target

FORMAT = "draftsmith"
FORMAT_VERSION = 1
# A drafter trained with an adapted target (Medusa-2) is exported with the target's peft adapter in this
# folder, named by config.json under ADAPTER_KEY; the target must run with it merged in.
ADAPTER_DIR = "adapter"
ADAPTER_KEY = "target_adapter"


@dataclass(frozen=True)
class TargetNeeds:
    """What a drafter reads from the frozen target.

    ``hidden_layers`` index the target's ``hidden_states`` tuple as transformers returns it:
    0 = embeddings, i = output of decoder layer i, -1 = last entry (after the final norm).
    ``logits``: the target's next-token logits (for distillation losses).
    """

    hidden_layers: tuple[int, ...] = ()
    logits: bool = False

    @property
    def any(self) -> bool:
        """Does the drafter read the target at all? One that does not trains without target forwards."""
        return bool(self.hidden_layers) or self.logits


@dataclass
class LossOutput:
    """What ``Drafter.loss`` returns; training logs it and turns it into a tau estimate.

    ``loss``: the scalar to minimise. Per draft position k (0-based: the k+1-th token below the root),
    ``hits[k, r]`` counts the positions whose label was the drafter's rank-r candidate and ``counts[k]`` the
    positions that counted, summed over the batch (so sums over batches and processes stay exact).
    ``logs``: extra scalars to log as ``train/NAME`` (e.g. a KL term).
    """

    loss: torch.Tensor
    hits: torch.Tensor  # [K, R] float
    counts: torch.Tensor  # [K] float
    logs: dict[str, torch.Tensor] = field(default_factory=dict)

    def top1(self) -> torch.Tensor:
        """Per-position top-1 accuracy ``[K]``."""
        return self.hits[:, 0] / self.counts.clamp_min(1)

    def rank_accuracy(self) -> list[list[float]]:
        """``rank_acc[k][r] = hits[k, r] / counts[k]``, as plain floats."""
        hits = self.hits.detach().double().cpu()
        return (hits / self.counts.detach().double().cpu().clamp_min(1.0)[:, None]).tolist()


@dataclass
class Draft:
    """A token tree below the root (see module docstring).

    ``probs[i]`` is the drafter's distribution that node ``i`` was *sampled* from (shared by siblings).
    ``None`` means the nodes were chosen deterministically (top-k, lookup); the evaluator then treats
    each sibling as a deterministic candidate, which keeps speculative sampling lossless for any tree of
    distinct siblings.
    """

    tokens: torch.Tensor  # [n] long
    parents: torch.Tensor  # [n] long
    probs: torch.Tensor | None = None  # [n, vocab] float, or None

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @classmethod
    def chain(cls, tokens: torch.Tensor | list[int], probs: torch.Tensor | None = None) -> Draft:
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        parents = torch.arange(-1, tokens.numel() - 1, dtype=torch.long)
        return cls(tokens=tokens, parents=parents, probs=probs)

    @classmethod
    def empty(cls) -> Draft:
        return cls(tokens=torch.empty(0, dtype=torch.long), parents=torch.empty(0, dtype=torch.long))


@dataclass
class DecodeState:
    """What a drafter sees when asked for a draft.

    ``hidden[layer]`` holds the target's hidden states for positions ``0 .. len(tokens) - 2`` (every
    position already in the target's cache; the root has none yet). ``new_from`` is the first position
    whose hidden state is new since the previous `propose` call of this sequence, for drafters that keep
    incremental state of their own.
    """

    tokens: torch.Tensor  # [L] long, prompt + generated, last = root
    prompt_len: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [L-1, H]
    new_from: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy


@dataclass
class DrafterConfig:
    """Base of every drafter's serializable hyper-parameters. Subclasses add their own fields."""

    kind: ClassVar[str] = ""

    # Pretrained weights to start training from: a folder or Hub id (see `Drafter.init_weights`), or "target".
    init_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DrafterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"kind"})
        if unknown:
            raise DraftsmithError(f"unknown {cls.kind} drafter option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in names})


@runtime_checkable
class Decoder(Protocol):
    """The part of the evaluator's engine a drafter that drafts with the target itself may use: its target
    ``model``, and ``forward`` at cache slots past the verified length (see `eval.engine.SpeculativeDecoder`)."""

    model: nn.Module

    def forward(
        self, input_ids: torch.Tensor, start: int, depths: torch.Tensor, visible: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, Any]: ...

    def generate(self, prompt_ids: list[int], drafter: Drafter, max_new_tokens: int) -> Any: ...


@runtime_checkable
class Tunable(Protocol):
    """A training-free drafter whose settings are searched per target by timing decoding through the engine
    (`for_target` reuses a saved result; otherwise the evaluator calls `tune` once)."""

    needs_tuning: bool

    def tune(self, decoder: Decoder, prompts: list[list[int]], progress: bool = True) -> None: ...


@runtime_checkable
class UsesDecoder(Protocol):
    """A drafter that drafts with the target itself (layer skipping) implements this to get the engine before
    each sequence."""

    def attach_decoder(self, decoder: Decoder) -> None: ...


_REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    """Class decorator: make a drafter kind loadable by name from configs and exports."""
    _REGISTRY[cls.config_class.kind] = cls
    return cls


def drafter_kinds() -> list[str]:
    return sorted(_REGISTRY)


def drafter_class(kind: str) -> type[Drafter]:
    if kind not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise DraftsmithError(f"unknown drafter kind {kind!r}; known kinds: {known}")
    return _REGISTRY[kind]


class Drafter(nn.Module):
    """Base class of all drafters. Trainable kinds implement `loss`; every kind implements `propose`.

    Weights borrowed from the frozen target (an LM head, embeddings) are attached with `bind` and are
    never part of ``state_dict``: an export holds the drafter's own weights only.
    """

    config_class: ClassVar[type[DrafterConfig]] = DrafterConfig
    # Config fields training measures and sets (through `calibrate`); a resumed run takes them from its checkpoint.
    measured_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def for_target(cls, target: Target) -> Drafter:
        """The kind with its default settings, ready for ``target`` (what ``drafter=KIND`` evaluates)."""
        drafter = cls(cls.config_class())
        drafter.bind(target.model)
        return drafter

    def target_needs(self) -> TargetNeeds:
        return TargetNeeds()

    def bind(self, target: nn.Module) -> None:  # noqa: B027 - optional hook, no-op by default
        """Attach (frozen, unsaved) references to the target's modules this drafter shares."""

    def reset(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Forget per-sequence state; called by the evaluator before each new sequence."""

    def max_draft_nodes(self) -> int | None:
        """The most nodes one draft can have, if known: the evaluator sizes the KV cache's draft room by it
        (every verification attends over the whole cache, so room never used still costs)."""
        return None

    def init_weights(self, source: str, target: nn.Module) -> None:
        """Start a fresh drafter from pretrained weights (``drafter.init_from``) before training.

        ``source`` is a local folder or Hub id holding a ``model.safetensors`` with this drafter's own keys (a
        draftsmith export of the same kind, say), or ``"target"``: a kind that is built from the target's own
        layers (a slice of its decoder) overrides this method to copy them.
        """
        if source == "target":
            raise DraftsmithError(f"drafter kind {self.config.kind!r} cannot start from the target's own layers")
        from safetensors.torch import load_file

        weights = resolve_export(source, need_config=False) / "model.safetensors"
        if not weights.is_file():
            raise DraftsmithError(f"drafter.init_from={source}: {weights} does not exist")
        try:
            self.load_state_dict(_read_weights(weights, load_file))
        except RuntimeError as err:  # missing / unexpected keys or shapes: another kind, size or draft vocabulary
            first = str(err).strip().splitlines()[0]
            raise DraftsmithError(
                f"drafter.init_from={source}: its weights do not fit this drafter ({first}); start from an export "
                "of the same kind and settings (num_heads, draft_vocab, ...)"
            ) from None

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} is training-free: it has no loss")

    def calibrate(self, rank_accuracy: list[list[float]]) -> None:  # noqa: B027 - optional hook
        """Training hands over the per-position, per-rank accuracies measured on the held-out split after each
        validation; a drafter may shape its drafts from them (a tree drafter builds its tree)."""

    def restore_measured(self, values: dict[str, Any]) -> None:
        """Take the `measured_fields` a checkpoint saved (a resumed run continues with what was measured)."""
        for name, value in values.items():
            setattr(self.config, name, value)

    def set_draft_size(self, nodes: int) -> None:
        """Draft at most ``nodes`` tokens per step (the evaluator's ``tree_nodes``)."""
        raise DraftsmithError(f"drafter kind {self.config.kind!r} has no draft size to set (tree_nodes)")

    def draft_shape(self) -> dict[str, Any]:
        """What reports record about the drafts' shape (e.g. ``{"tree_nodes": 15}``); empty if nothing fixed."""
        return {}

    def propose(self, state: DecodeState) -> Draft:
        raise NotImplementedError

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    # -- persistence -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (this drafter's own weights only)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "drafter": self.config.to_dict(),
            **(extra_config or {}),
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        target: nn.Module | None = None,
        tokenizer_hash: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Drafter:
        """Load an export folder or Hub repo. With ``tokenizer_hash``, refuse a drafter made for a
        target whose tokenizer differs; with ``target``, bind the shared target modules; ``settings`` replace
        those of its config.json (decoding options; an option the kind lacks is an error naming it)."""
        from safetensors.torch import load_file

        directory = resolve_export(path_or_hub_id)
        config = read_export_config(directory)
        saved_hash = config.get("tokenizer_hash")
        if tokenizer_hash and saved_hash and saved_hash != tokenizer_hash:
            raise DraftsmithError(
                f"drafter {path_or_hub_id} was trained for a target with tokenizer {saved_hash[:12]}, "
                f"but this target's tokenizer is {tokenizer_hash[:12]}: evaluate it with its own target "
                f"({config.get('target', {}).get('name', 'see its config.json')})"
            )
        values = dict(config["drafter"]) | dict(settings or {})
        kind_cls = drafter_class(str(values.pop("kind", None)))
        if cls is not Drafter and not issubclass(kind_cls, cls):
            raise DraftsmithError(f"{path_or_hub_id} holds a {kind_cls.__name__}, not a {cls.__name__}")
        drafter = kind_cls(kind_cls.config_class.from_dict(values))
        if target is not None:
            drafter.bind(target)
        weights = directory / "model.safetensors"
        try:
            drafter.load_state_dict(_read_weights(weights, load_file))
        except RuntimeError as err:  # missing / unexpected keys or shapes: another kind's or version's weights
            first = str(err).strip().splitlines()[0]
            raise DraftsmithError(f"{weights} does not fit its config.json ({first}); re-export the drafter") from None
        drafter.export_config = config
        drafter.export_dir = directory
        return drafter


def read_export_config(directory: Path) -> dict[str, Any]:
    """An export's ``config.json``, checked for format and version; every fault is one line naming the file."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DraftsmithError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); re-export the drafter"
        ) from None
    except UnicodeDecodeError:
        raise DraftsmithError(f"{path} is not UTF-8 text, so not an export's config; re-export the drafter") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise DraftsmithError(f"{path} is not a draftsmith export (format={found!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise DraftsmithError(
            f"{path} has format_version {version!r}; this draftsmith reads version {FORMAT_VERSION}: "
            "re-export the drafter with this version, or load it with the draftsmith that wrote it"
        )
    if not isinstance(config.get("drafter"), dict):
        raise DraftsmithError(f"{path} has no 'drafter' settings; re-export the drafter")
    return config


def _read_weights(path: Path, load_file: Any) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DraftsmithError(f"{path} is missing: the export is incomplete; re-export or download it again")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise DraftsmithError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'corrupt'}); "
            "the file is truncated or corrupt: re-export or download it again"
        ) from None


def resolve_export(path_or_hub_id: str | Path, need_config: bool = True) -> Path:
    """A local export folder as is; anything else is treated as a Hub repo id and downloaded."""
    path = Path(path_or_hub_id)
    if path.exists() and not path.is_dir():
        raise DraftsmithError(f"{path} is a file; pass the export folder that holds config.json")
    if path.is_dir():
        if need_config and not (path / "config.json").is_file():
            raise DraftsmithError(f"{path} has no config.json: not a draftsmith export folder")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise DraftsmithError(
            f"drafter {path_or_hub_id!r} is neither a local export folder nor a reachable Hub repo "
            f"({type(err).__name__}); pass the path of an export folder"
        ) from None
