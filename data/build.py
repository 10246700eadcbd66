"""`build_distilled`: prompts -> target regeneration -> sharded store (resumable), plus the optional
feature cache. With ``out: null`` the folder is keyed by target, prompts and generation settings under the
shared cache, so a second run with the same inputs reuses it. ``data.unseen.out`` also writes synthesized prompts
the data leaves out as a question file for held-out evaluation."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm import tqdm

from draftsmith.data.config import DataConfig
from draftsmith.data.prompts import Conversation, load_prompts, prompts_hash
from draftsmith.data.regenerate import AnswerEngine, TransformersEngine, regenerate
from draftsmith.data.store import FORMAT, FORMAT_VERSION, ShardStore, check_same_run, shard_entry, summarize
from draftsmith.data.synth import synthesize_prompts, write_unseen_questions
from draftsmith.drafters.base import TargetNeeds
from draftsmith.drafters.chat import resolve_template
from draftsmith.drafters.errors import DraftsmithError, writable_folder
from draftsmith.drafters.target import Target, cache_root


def resolve_prompts(cfg: DataConfig, target: Target) -> list[Conversation]:
    if cfg.prompts == "synth":
        conversations = synthesize_prompts(target, cfg.synth, cfg.system_prompt, cfg.seed, cfg.chat_template)
        return conversations[: cfg.limit] if cfg.limit else conversations
    return load_prompts(cfg.prompts, cfg.split, cfg.limit)


def run_identity(cfg: DataConfig, target: Target, conversations: list[Conversation]) -> dict[str, Any]:
    """What decides the rows; a folder is continued or reused only if these match exactly."""
    return {
        "target": target.identity.to_dict(),
        "tokenizer_hash": target.identity.tokenizer_hash,
        "chat_template": resolve_template(target.tokenizer, cfg.chat_template),
        "generation": cfg.generation(),
        "prompts_hash": prompts_hash(conversations),
    }


def default_folder(identity: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "data" / f"{identity['target']['name']}-{digest}"


class _Progress:
    """A rows bar whose postfix shows target-written tokens and their rate."""

    def __init__(self, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="regenerating", unit="row")
        self.tokens = 0
        self.start = time.perf_counter()

    def on_batch(self, new_tokens: int) -> None:
        self.tokens += new_tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tokens=self.tokens, tok_s=f"{rate:.1f}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def answer_engine(cfg: DataConfig, target: Target) -> AnswerEngine:
    """The engine ``data.engine`` names, loaded (vLLM is imported only when asked for)."""
    if cfg.engine == "vllm":
        from draftsmith.data.vllm_engine import VllmEngine

        return VllmEngine(target, cfg)
    return TransformersEngine(target, cfg)


def _generate_missing(
    store: ShardStore, manifest: dict[str, Any], cfg: DataConfig, target: Target, conversations: list[Conversation]
) -> None:
    shard_rows = manifest["shard_rows"]
    done = store.done_shards()
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] in done]
    listed = {s["index"] for s in manifest["shards"]}
    for index in sorted(done - listed):  # renamed into place, but killed before the manifest caught up
        rows = list(datasets.load_from_disk(str(store.shard_path(index))))
        manifest["shards"].append(shard_entry(index, rows))
    todo = [i for i in range(manifest["n_shards"]) if i not in done]
    engine = answer_engine(cfg, target) if todo else None  # loaded before the bar: vLLM logs as it starts
    progress = _Progress(
        len(conversations),
        initial=len(conversations) - sum(len(conversations[i * shard_rows : (i + 1) * shard_rows]) for i in todo),
    )
    try:
        for index in todo:
            part = conversations[index * shard_rows : (index + 1) * shard_rows]
            with torch.random.fork_rng(devices=[target.device] if target.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed * 1_000_003 + index)
                rows = regenerate(target, part, cfg, on_batch=progress.on_batch, engine=engine)
            manifest["shards"].append(store.write_shard(index, rows))
            manifest["shards"].sort(key=lambda s: s["index"])
            manifest.update(summarize(manifest))
            store.write_manifest(manifest)
            progress.bar.update(len(part))
    finally:
        progress.close()


def build_distilled(cfg_data: Mapping[str, Any] | DataConfig, target: Target) -> Path:
    """Generate (or continue, or reuse) the distillation data of ``cfg_data`` for ``target``; returns its folder."""
    cfg = DataConfig.from_mapping(cfg_data)
    if cfg.out:  # before the slow steps: a file in the way fails at once
        writable_folder(cfg.out, "data.out")
    if cfg.engine == "vllm":  # before the slow steps: a missing vLLM fails at once
        from draftsmith.data.vllm_engine import require_vllm

        require_vllm()
    if cfg.unseen.out and Path(cfg.unseen.out).is_dir():
        raise DraftsmithError(f"data.unseen.out={cfg.unseen.out} is a folder: pass the path of the .jsonl to write")
    write_unseen_questions(target, cfg)  # first: seconds, kept even if the regeneration below is interrupted
    conversations = resolve_prompts(cfg, target)
    identity = run_identity(cfg, target, conversations)
    folder = Path(cfg.out) if cfg.out else default_folder(identity)
    store = ShardStore(folder)
    with store.writing():
        manifest = store.read_manifest()
        if manifest is not None:
            check_same_run(manifest, identity, folder)
            if not {s["index"] for s in manifest["shards"]} <= store.done_shards():
                manifest["complete"] = False  # a listed shard folder is gone: regenerate it
        else:
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                **identity,
                "prompts_source": cfg.prompts,
                "n_conversations": len(conversations),
                # A resumed folder keeps the shard size it was started with: shards map to conversations by index.
                "shard_rows": cfg.shard_rows,
                "n_shards": -(-len(conversations) // cfg.shard_rows),
                "shards": [],
                "complete": False,
            }
            store.write_manifest(manifest)
        if not manifest["complete"]:
            _generate_missing(store, manifest, cfg, target, conversations)
            manifest.update(summarize(manifest), complete=True)
            store.write_manifest(manifest)
    if cfg.features.enabled:
        from draftsmith.data.features import write_feature_cache

        write_feature_cache(folder, target, TargetNeeds(hidden_layers=cfg.features.layers), cfg.features.topk)
    return folder
