"""Offline prompt synthesis, Magpie-style: the instruct target, given only its chat template's system and
user headers, writes what a user would ask. Sampled, first line kept, junk filtered, deduplicated.

Batch ``b`` is sampled with a seed derived from (seed, b), and every batch's accepted prompts are appended
to a cache file as one JSON line, so an interrupted synthesis continues where it stopped and gives the same
prompts as an uninterrupted one. The cache key leaves out ``n``: asking for more prompts extends the file,
which is also how ``write_unseen_questions`` finds prompts from the same generator that the data never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from draftsmith.data.config import DataConfig, SynthConfig
from draftsmith.data.prompts import Conversation
from draftsmith.drafters.chat import SENTINEL, ChatTemplate
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target, cache_root

MIN_CHARS = 12
MIN_LETTERS = 6
# A target that keeps producing nothing usable (a random or base model) is stopped after this many batches
# beyond what the requested count should need.
EXTRA_BATCHES = 20


def user_header(template: ChatTemplate) -> str:
    """The rendered chat up to where a user's first message would begin (system header + user header)."""
    text = template.render([{"role": "user", "content": SENTINEL}], generation_prompt=False)
    return text[: text.index(SENTINEL)]


def first_line(text: str) -> str | None:
    """The first line of a sampled continuation if it looks like a real prompt, else None."""
    line = text.split("\n", 1)[0].strip()
    if len(line) < MIN_CHARS or len(re.findall(r"[^\W\d_]", line)) < MIN_LETTERS:
        return None
    return line


def _dedup_key(line: str) -> str:
    return " ".join(line.lower().split())


def _cache_file(target: Target, cfg: SynthConfig, template: ChatTemplate, seed: int) -> Path:
    key = {
        "target": target.identity.to_dict(),
        "chat_template": template.template,
        "system": template.system,
        "seed": seed,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "prompts" / f"synth-{target.identity.name}-{digest}.jsonl"


def _read_batches(path: Path) -> list[list[str]]:
    """Complete batch lines of the cache file; a torn last line (killed while writing) is dropped."""
    if not path.is_file():
        return []
    batches: list[list[str]] = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for line in lines[:-1]:  # the part after the last newline was never finished
        record = json.loads(line)
        if record["batch"] != len(batches):
            raise DraftsmithError(f"prompt cache {path} is corrupt (batch {record['batch']} out of order); delete it")
        batches.append(record["prompts"])
    if lines[-1]:
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len("\n".join(lines[:-1]).encode()) + (1 if len(lines) > 1 else 0))
    return batches


def _newline_ids(tokenizer: Any) -> list[int]:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if "\n" in text]


@torch.inference_mode()
def _sample_batch(target: Target, header_ids: list[int], cfg: SynthConfig, stop_ids: list[int], seed: int) -> list[str]:
    ids = torch.tensor([header_ids] * cfg.batch_size, device=target.device)
    with torch.random.fork_rng(devices=[target.device] if target.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = target.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=float(cfg.temperature),
            top_p=float(cfg.top_p),
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
        )
    stops = set(stop_ids)
    texts = []
    for new in out[:, ids.shape[1] :].tolist():
        # A continuation that never reached a line end or stop token is a cut-off prompt: not kept.
        end = next((i for i, token in enumerate(new) if token in stops), None)
        texts.append(target.tokenizer.decode(new[: end + 1], skip_special_tokens=True) if end is not None else "")
    return texts


def synthesize_prompts(
    target: Target,
    cfg: SynthConfig,
    system_prompt: str | None = None,
    seed: int = 0,
    chat_template: str | None = None,
) -> list[Conversation]:
    """``cfg.n`` distinct single-turn prompts written by the target, cached under the shared cache folder."""
    template = ChatTemplate(target.tokenizer, system_prompt, chat_template)
    path = _cache_file(target, cfg, template, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = _read_batches(path)
    seen: set[str] = set()
    kept: list[str] = []
    for batch in batches:
        seen.update(_dedup_key(p) for p in batch)
        kept.extend(batch)
    if len(kept) < cfg.n:
        header_ids = template.encode(user_header(template))
        stop_ids = template.stop_ids + _newline_ids(target.tokenizer)
        max_batches = -(-cfg.n // cfg.batch_size) + EXTRA_BATCHES
        bar = tqdm(total=cfg.n, initial=min(len(kept), cfg.n), desc="synthesizing prompts", unit="prompt")
        with open(path, "a", encoding="utf-8") as cache:
            while len(kept) < cfg.n:
                if len(batches) >= max_batches:
                    raise DraftsmithError(
                        f"the target wrote only {len(kept)} usable prompts in {len(batches)} batches of "
                        f"{cfg.batch_size}; use an instruct target, a lower data.synth.n, or a prompt file"
                    )
                fresh = []
                for text in _sample_batch(target, header_ids, cfg, stop_ids, seed=seed * 1_000_003 + len(batches)):
                    line = first_line(text)
                    if line is not None and _dedup_key(line) not in seen:
                        seen.add(_dedup_key(line))
                        fresh.append(line)
                cache.write(json.dumps({"batch": len(batches), "prompts": fresh}, ensure_ascii=False) + "\n")
                cache.flush()
                os.fsync(cache.fileno())
                batches.append(fresh)
                kept.extend(fresh)
                bar.update(min(len(fresh), cfg.n - bar.n))
        bar.close()
    return [Conversation(id=f"synth-{i:05d}", category="synth", turns=[p]) for i, p in enumerate(kept[: cfg.n])]


def write_unseen_questions(target: Target, cfg: DataConfig) -> Path | None:
    """Write the ``cfg.unseen.count`` prompts synthesized after the ``cfg.synth.n`` the data uses to
    ``cfg.unseen.out`` as an eval question file (JSONL ``{"id", "category", "turns"}``); returns its path, or
    None when ``cfg.unseen.out`` is not set."""
    if cfg.unseen.out is None:
        return None
    extended = dataclasses.replace(cfg.synth, n=cfg.synth.n + cfg.unseen.count)
    unseen = synthesize_prompts(target, extended, cfg.system_prompt, cfg.seed, cfg.chat_template)[cfg.synth.n :]
    path = Path(cfg.unseen.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in unseen:
            f.write(json.dumps({"id": c.id, "category": c.category, "turns": c.turns}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
