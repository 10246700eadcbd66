"""The sharded distillation store: ``shards/shard-NNNNN`` (each a `datasets` save_to_disk folder) and
``manifest.json``.

Shard ``i`` holds the rows of conversations ``[i * shard_rows, (i + 1) * shard_rows)``. A shard is written to
a temporary folder and renamed into place, so a shard folder on disk is always whole; the shard folders,
not the manifest, say what is done. Killing the writer at any moment and running it again therefore loses
no row and writes none twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from draftsmith.drafters.errors import DraftsmithError

FORMAT = "draftsmith-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# What must match for a folder to be continued or reused: a different value means different rows.
IDENTITY_KEYS = ("target", "tokenizer_hash", "chat_template", "generation", "prompts_hash")

ROW_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "category": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "n_turns": datasets.Value("int32"),
        "prompt_len": datasets.Value("int32"),
        "n_target_tokens": datasets.Value("int32"),
        "n_truncated": datasets.Value("int32"),
    }
)


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a distillation folder; DraftsmithError if it is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DraftsmithError(
            f"{directory} is not a distillation data folder (no {MANIFEST}); build it with python -m data"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DraftsmithError(
            f"{path} is corrupt ({err}): delete it and run the same command again "
            "(it rebuilds the manifest and keeps the shards already written)"
        ) from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise DraftsmithError(f"{path} is not a draftsmith data manifest (format={found!r})")
    return manifest


class ShardStore:
    """One distillation folder: its shards, its manifest, and a lock against two concurrent writers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.shards_dir = self.root / "shards"

    def shard_path(self, index: int) -> Path:
        return self.shards_dir / f"shard-{index:05d}"

    def done_shards(self) -> set[int]:
        if not self.shards_dir.is_dir():
            return set()
        return {
            int(p.name.split("-")[1]) for p in self.shards_dir.iterdir() if p.name.startswith("shard-") and p.is_dir()
        }

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the folder's write lock; leftovers of killed writers are removed first."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DraftsmithError(
                    f"another process is writing {self.root}; wait for it or use another data.out"
                ) from None
            for leftover in self.shards_dir.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield

    def write_shard(self, index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Write shard ``index`` atomically; returns its manifest entry."""
        tmp = self.shards_dir / f".tmp-{index:05d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_datasets():  # our own bar counts rows; one "Saving the dataset" bar per shard is noise
            datasets.Dataset.from_list(rows, features=ROW_FEATURES).save_to_disk(str(tmp))
        os.rename(tmp, self.shard_path(index))
        return shard_entry(index, rows)

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.root) if (self.root / MANIFEST).is_file() else None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        _atomic_write_json(self.root / MANIFEST, manifest)


def shard_entry(index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": index,
        "name": f"shards/shard-{index:05d}",
        "rows": len(rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "target_tokens": sum(r["n_target_tokens"] for r in rows),
    }


def check_same_run(manifest: dict[str, Any], expected: dict[str, Any], directory: Path) -> None:
    """Refuse to continue or reuse a folder made with another target, tokenizer, settings or prompts."""
    differing = [key for key in IDENTITY_KEYS if manifest.get(key) != expected.get(key)]
    if differing:
        raise DraftsmithError(
            f"{directory} holds data made with a different {', '.join(differing)}; use another data.out "
            "(or data.out=null for the shared cache), or delete that folder"
        )


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """Totals over the shards listed in a manifest."""
    shards = manifest.get("shards", [])
    return {
        "rows": sum(s["rows"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "target_tokens": sum(s["target_tokens"] for s in shards),
    }


def load_distilled(directory: str | Path, allow_incomplete: bool = False) -> datasets.Dataset:
    """The rows of a distillation folder, in conversation order (memory-mapped, not copied)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest.get("complete") and not allow_incomplete:
        raise DraftsmithError(
            f"{directory} is incomplete ({len(manifest.get('shards', []))} of {manifest.get('n_shards')} shards); "
            "run the same `python -m data ...` command again to finish it"
        )
    parts = [_load_shard(directory / s["name"]) for s in sorted(manifest["shards"], key=lambda s: s["index"])]
    if not parts:
        return datasets.Dataset.from_list([], features=ROW_FEATURES)
    return datasets.concatenate_datasets(parts)


def _load_shard(path: Path) -> datasets.Dataset:
    if not path.is_dir():
        raise DraftsmithError(f"{path} is missing: run the same command again to regenerate that shard")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # datasets and arrow raise many types for a damaged folder
        raise DraftsmithError(
            f"{path} cannot be read ({type(err).__name__}): the shard is damaged; delete that folder and run the "
            "same command again to regenerate it"
        ) from None
