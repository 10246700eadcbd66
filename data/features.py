"""Target features for training: computed online (`target_features`) or read from a cache (`FeatureCache`).

Both give the same dict for the same padded batch:
``{"hidden": {layer: [B, T, H]}, "logits": [B, T, V]?, "topk_logprobs": [B, T, k]?, "topk_ids": [B, T, k]?}``
with padded positions (attention_mask == 0) set to zero, so the two can be compared (and swapped) directly.
The cache sits beside the dataset in ``features-layers<L>-top<k>/``: one safetensors file per data shard,
per-row tensors, written atomically, resumable shard by shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from draftsmith.data.store import load_distilled, read_manifest
from draftsmith.drafters.base import TargetNeeds
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target

FEATURES_MANIFEST = "features.json"
CACHE_BATCH_ROWS = 8


def target_features(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    needs: TargetNeeds,
    topk: int = 0,
    grad: bool = False,
) -> dict[str, Any]:
    """One target forward over a padded batch (left or right padding: positions follow the mask).

    By default no gradients flow into the target, and the returned tensors are plain (not inference-mode)
    tensors, so a training step can use them as inputs to its own autograd graph. ``grad=True`` keeps the
    target's graph (when autograd is on), for a target trained through adapters (Medusa-2).
    """
    want_logits = needs.logits or topk > 0
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # what follows the forward keeps a graph only if the forward made one
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=bool(needs.hidden_layers),
            use_cache=False,
            # Without logits, project only one position: the vocabulary projection dominates the forward's cost.
            logits_to_keep=0 if want_logits else 1,
        )
    valid = attention_mask.bool().unsqueeze(-1)

    def zero_pads(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))

    features: dict[str, Any] = {"hidden": {layer: zero_pads(out.hidden_states[layer]) for layer in needs.hidden_layers}}
    if needs.logits:
        features["logits"] = zero_pads(out.logits)
    if topk:
        values, ids = torch.log_softmax(out.logits.float(), dim=-1).topk(topk, dim=-1)
        features["topk_logprobs"] = zero_pads(values)
        features["topk_ids"] = zero_pads(ids)
    return features


def cache_folder(dataset_dir: str | Path, needs: TargetNeeds, topk: int) -> Path:
    layers = "_".join(str(layer) for layer in needs.hidden_layers) or "none"
    return Path(dataset_dir) / f"features-layers{layers}-top{topk}"


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _row_tensors(features: dict[str, Any], i: int, length: int, row: int) -> dict[str, torch.Tensor]:
    tensors = {f"{row}.hidden.{layer}": h[i, :length] for layer, h in features["hidden"].items()}
    for key in ("topk_logprobs", "topk_ids"):
        if key in features:
            tensors[f"{row}.{key}"] = features[key][i, :length]
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_feature_cache(
    dataset_dir: str | Path, target: Target, needs: TargetNeeds, topk: int = 0, batch_rows: int = CACHE_BATCH_ROWS
) -> Path:
    """Cache ``needs.hidden_layers`` hidden states and top-``topk`` log-probs of every row; returns the folder."""
    if needs.logits:
        raise DraftsmithError(
            "full target logits are not cached (vocabulary-wide per token); use data.features.topk "
            "for distillation targets, or train online"
        )
    dataset_dir = Path(dataset_dir)
    data_manifest = read_manifest(dataset_dir)
    rows = load_distilled(dataset_dir)
    folder = cache_folder(dataset_dir, needs, topk)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = str(next(target.model.parameters()).dtype).removeprefix("torch.")
    identity = {
        "target": target.identity.to_dict(),
        "dtype": dtype,
        "prompts_hash": data_manifest["prompts_hash"],
        "generation": data_manifest["generation"],
        "layers": list(needs.hidden_layers),
        "topk": topk,
    }
    manifest_path = folder / FEATURES_MANIFEST
    if manifest_path.is_file():
        existing = _read_manifest(manifest_path)
        if {k: existing.get(k) for k in identity} != identity:
            raise DraftsmithError(f"{folder} was cached for another target, dtype or dataset; delete it to rebuild")
    pad_id = target.tokenizer.pad_token_id or 0
    shards, start = [], 0
    for entry in sorted(data_manifest["shards"], key=lambda s: s["index"]):
        shards.append(
            {"file": f"shard-{entry['index']:05d}.safetensors", "start": start, "stop": start + entry["rows"]}
        )
        start += entry["rows"]
    for shard in shards:  # a damaged shard is not kept as if it were whole
        if (folder / shard["file"]).is_file():
            _check_shard(folder / shard["file"])
    bar = tqdm(total=len(rows), desc="caching target features", unit="row")
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            tensors: dict[str, torch.Tensor] = {}
            for first in range(shard["start"], shard["stop"], batch_rows):
                index = list(range(first, min(first + batch_rows, shard["stop"])))
                ids = rows.select(index)["input_ids"]
                input_ids, mask = _right_pad(ids, pad_id)
                features = target_features(
                    target.model, input_ids.to(target.device), mask.to(target.device), needs, topk
                )
                for i, row in enumerate(index):
                    tensors.update(_row_tensors(features, i, len(ids[i]), row))
                bar.update(len(index))
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path)
        else:
            bar.update(shard["stop"] - shard["start"])
    bar.close()
    n_bytes = sum((folder / s["file"]).stat().st_size for s in shards)
    n_tokens = sum(len(r) for r in rows["input_ids"])
    manifest = {
        **identity,
        "shards": shards,
        "rows": len(rows),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "complete": True,
    }
    tmp = manifest_path.with_name(f".{FEATURES_MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    print(f"feature cache {folder}: {n_bytes / 1e6:.1f} MB, {manifest['bytes_per_token']:.0f} bytes per token")
    return folder


REBUILD = "run again with data.features.enabled=true to rebuild it"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DraftsmithError(f"{path} is corrupt ({err}): delete the folder {path.parent} and {REBUILD}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        raise DraftsmithError(f"{path} is not a feature cache manifest: delete the folder {path.parent} and {REBUILD}")
    return manifest


def _check_shard(path: Path) -> None:
    if not path.is_file():
        raise DraftsmithError(f"feature cache shard {path} is missing: {REBUILD}")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise DraftsmithError(f"{path} is truncated or corrupt ({first}): delete it and {REBUILD}") from None


class FeatureCache:
    """Read a feature cache: ``batch(rows, pad_to)`` equals ``target_features`` on the right-padded batch."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / FEATURES_MANIFEST
        if not path.is_file():
            raise DraftsmithError(
                f"{self.directory} is not a feature cache (no {FEATURES_MANIFEST}); "
                "build it with data.features.enabled=true"
            )
        self.manifest = _read_manifest(path)
        if not self.manifest.get("complete"):
            raise DraftsmithError(f"feature cache {self.directory} is incomplete; run the data command again")
        for shard in self.manifest["shards"]:  # headers only: a truncated file fails here, not mid-training
            _check_shard(self.directory / shard["file"])
        self.layers = tuple(self.manifest["layers"])
        self.topk = int(self.manifest["topk"])
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def _shard_of(self, row: int) -> Any:
        for shard in self.manifest["shards"]:
            if shard["start"] <= row < shard["stop"]:
                if shard["file"] not in self._handles:
                    self._handles[shard["file"]] = safe_open(str(self.directory / shard["file"]), framework="pt")
                return self._handles[shard["file"]]
        raise DraftsmithError(f"row {row} is outside the feature cache ({len(self)} rows)")

    def row(self, row: int) -> dict[str, torch.Tensor]:
        """The unpadded tensors of one row: ``hidden.<layer>`` [T, H], ``topk_logprobs`` / ``topk_ids`` [T, k]."""
        handle = self._shard_of(row)
        prefix = f"{row}."
        return {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}

    def batch(self, row_indices: Sequence[int], pad_to: int | None = None) -> dict[str, Any]:
        """Right-padded to ``pad_to`` (default: the longest row); longer rows are cut to ``pad_to``, as a
        collator cuts their ``input_ids``. Padded positions are zero."""
        per_row = [self.row(int(r)) for r in row_indices]
        lengths = [next(iter(r.values())).shape[0] if r else 0 for r in per_row]
        width = pad_to if pad_to is not None else max(lengths, default=0)

        def stack(key: str) -> torch.Tensor:
            first = per_row[0][key]
            out = torch.zeros((len(per_row), width, *first.shape[1:]), dtype=first.dtype)
            for i, r in enumerate(per_row):
                n = min(r[key].shape[0], width)
                out[i, :n] = r[key][:n]
            return out

        features: dict[str, Any] = {"hidden": {layer: stack(f"hidden.{layer}") for layer in self.layers}}
        if self.topk:
            features["topk_logprobs"] = stack("topk_logprobs")
            features["topk_ids"] = stack("topk_ids")
        return features
