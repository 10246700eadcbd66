"""The one Drafter interface every drafter kind implements, and the objects it exchanges.

Decoding contract (the evaluator in `eval/` is the only caller of `propose`):

* The verified sequence is ``state.tokens``; its last token is the *root*: it is verified (the target
  chose it) but has not been fed to the target yet, so the target's KV cache holds ``tokens[:-1]``.
* A `Draft` is a token tree hanging below the root. Node ``i`` has token ``tokens[i]`` and parent
  ``parents[i]`` (``-1`` = the root). Nodes are in topological order (``parents[i] < i``). A chain is a
  tree where ``parents == [-1, 0, 1, ...]``.
* The evaluator verifies the whole tree in one target forward, appends the accepted path plus the
  target's own bonus token, and calls `propose` again.

Training contract: ``loss(batch, features)`` where ``features`` holds what ``target_needs()`` asked for,
computed by the frozen target either online or from the feature cache.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from drafters.errors import DraftsmithError

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
    greedy: bool = True
    generator: torch.Generator | None = None


@dataclass
class DrafterConfig:
    """Base of every drafter's serializable hyper-parameters. Subclasses add their own fields."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DrafterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"kind"})
        if unknown:
            raise DraftsmithError(f"unknown {cls.kind} drafter option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in names})


_REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    """Class decorator: make a drafter kind loadable by name from configs and exports."""
    _REGISTRY[cls.config_class.kind] = cls
    return cls


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

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config

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

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is training-free: it has no loss")

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
        cls, path_or_hub_id: str | Path, target: nn.Module | None = None, tokenizer_hash: str | None = None
    ) -> Drafter:
        """Load an export folder or Hub repo. With ``tokenizer_hash``, refuse a drafter made for a
        target whose tokenizer differs; with ``target``, bind the shared target modules."""
        from safetensors.torch import load_file

        directory = resolve_export(path_or_hub_id)
        config = json.loads((directory / "config.json").read_text())
        if config.get("format") != FORMAT:
            found = config.get("format")
            raise DraftsmithError(f"{directory}/config.json is not a draftsmith export (format={found!r})")
        saved_hash = config.get("tokenizer_hash")
        if tokenizer_hash and saved_hash and saved_hash != tokenizer_hash:
            raise DraftsmithError(
                f"drafter {path_or_hub_id} was trained for a target with tokenizer {saved_hash[:12]}, "
                f"but this target's tokenizer is {tokenizer_hash[:12]}: evaluate it with its own target "
                f"({config.get('target', {}).get('name', 'see its config.json')})"
            )
        values = dict(config["drafter"])
        kind_cls = drafter_class(values.pop("kind"))
        if cls is not Drafter and not issubclass(kind_cls, cls):
            raise DraftsmithError(f"{path_or_hub_id} holds a {kind_cls.__name__}, not a {cls.__name__}")
        drafter = kind_cls(kind_cls.config_class.from_dict(values))
        if target is not None:
            drafter.bind(target)
        drafter.load_state_dict(load_file(str(directory / "model.safetensors")))
        drafter.export_config = config
        drafter.export_dir = directory
        return drafter


def resolve_export(path_or_hub_id: str | Path) -> Path:
    """A local export folder as is; anything else is treated as a Hub repo id and downloaded."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        if not (path / "config.json").is_file():
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
