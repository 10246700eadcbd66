"""Offline prompt synthesis, Magpie-style: the instruct target, given only its chat template's system and
user headers, writes what a user would ask. Sampled, first line kept, junk filtered, deduplicated.

``data.synth.domain`` steers what the prompts are about, the way Magpie writes domain-specific sets: a domain's
system prompt (what the assistant is for) and an opener the user's message begins with, one opener per batch in
turn; the target writes the rest of the line. Each domain is its own stream with its own cache; a mix splits
``n`` between them by weight. No prompt repeats another across the domains, nor a question of the shipped
evaluation sets (eval/question_sets/), compared lower-cased with whitespace collapsed.

Batch ``b`` of a stream is sampled with a seed derived from (seed, b), and every batch's accepted prompts are
appended to a cache file as one JSON line, so an interrupted synthesis continues where it stopped and gives the
same prompts as an uninterrupted one. The cache key leaves out ``n``: asking for more prompts extends the file,
which is also how ``write_unseen_questions`` finds prompts from the same generator that the data never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from draftsmith.data.config import DataConfig, SynthConfig
from draftsmith.data.prompts import Conversation
from draftsmith.drafters.chat import SENTINEL, ChatTemplate
from draftsmith.drafters.conversations import read_conversations
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target, cache_root

MIN_CHARS = 12
MIN_LETTERS = 6
# A target that keeps producing nothing usable (a random or base model) is stopped after this many batches
# beyond what the requested count should need.
EXTRA_BATCHES = 20


@dataclass(frozen=True)
class Steer:
    """How one domain's prompts are begun. ``system_prompt`` None and no openers: the chat template's own header
    (``data.system_prompt``) and a blank user message, as before domains existed."""

    category: str  # the prompts' category, and their id prefix
    system_prompt: str | None = None
    openers: tuple[str, ...] = ()


# A 135M target given only a domain's system prompt still writes mostly general prompts; a few opening words
# steer it far more reliably (measured on SmolLM2-135M-Instruct), so both are used.
STEERS = {
    "general": Steer("synth"),
    "code": Steer(
        "code",
        "You are a helpful assistant for Python programming. Users ask you to write short, self-contained Python "
        "functions and programs.",
        (
            "Write a Python function that",
            "Implement a Python function to",
            "Write a Python program that",
            "Write a function that takes a list of",
            "Write a Python function that returns",
            "Create a Python class that",
            "Write a Python function that checks whether",
            "Write a function that takes a string and",
        ),
    ),
    "math": Steer(
        "math",
        "You are a helpful math tutor. Users ask you to solve arithmetic, algebra and word problems step by step.",
        (
            "Solve",
            "Calculate",
            "A train",
            "A store sells",
            "Find the value of",
            "If a number",
            "How many",
            "What is the sum of",
        ),
    ),
}


def user_header(template: ChatTemplate) -> str:
    """The rendered chat up to where a user's first message would begin (system header + user header)."""
    text = template.render([{"role": "user", "content": SENTINEL}], generation_prompt=False)
    return text[: text.index(SENTINEL)]


def first_line(text: str) -> str | None:
    """The first line of a sampled continuation if it looks like a real prompt, else None."""
    line = text.split("\n", 1)[0].strip()
    if len(line) < MIN_CHARS or len(re.findall(r"[^\W\d_]", line)) < MIN_LETTERS:
        return None
    if line.endswith((":", ",")):  # the request went on in the lines not kept
        return None
    return line


def _dedup_key(line: str) -> str:
    return " ".join(line.lower().split())


def evaluation_keys() -> set[str]:
    """The compared form of every turn of the shipped evaluation question sets."""
    keys: set[str] = set()
    for file in (resources.files("draftsmith.eval") / "question_sets").iterdir():
        if file.name.endswith(".jsonl"):
            keys.update(
                _dedup_key(turn) for c in read_conversations(Path(str(file)), "question file") for turn in c.turns
            )
    return keys


def _cache_file(target: Target, cfg: SynthConfig, template: ChatTemplate, seed: int, steer: Steer) -> Path:
    key: dict[str, Any] = {
        "target": target.identity.to_dict(),
        "chat_template": template.template,
        "system": template.system,
        "seed": seed,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
    }
    if steer.openers:  # general's key stays what it was, so its existing caches keep serving
        key["openers"] = list(steer.openers)
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


def _stream(
    target: Target, cfg: SynthConfig, steer: Steer, system_prompt: str | None, seed: int, chat_template: str | None
) -> Callable[[int], list[str]]:
    """One domain's prompts: a function giving the first ``n`` distinct ones, synthesizing and caching those not
    cached yet."""
    template = ChatTemplate(target.tokenizer, steer.system_prompt if steer.openers else system_prompt, chat_template)
    path = _cache_file(target, cfg, template, seed, steer)
    openers = steer.openers or ("",)

    def first(n: int) -> list[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        batches = _read_batches(path)
        seen: set[str] = set()
        kept: list[str] = []
        for batch in batches:
            seen.update(_dedup_key(p) for p in batch)
            kept.extend(batch)
        if len(kept) >= n:
            return kept[:n]
        stop_ids = template.stop_ids + _newline_ids(target.tokenizer)
        max_batches = -(-n // cfg.batch_size) + EXTRA_BATCHES
        desc = f"synthesizing {steer.category} prompts" if steer.openers else "synthesizing prompts"
        bar = tqdm(total=n, initial=len(kept), desc=desc, unit="prompt")
        with open(path, "a", encoding="utf-8") as cache:
            while len(kept) < n:
                if len(batches) >= max_batches:
                    raise DraftsmithError(
                        f"the target wrote only {len(kept)} usable prompts in {len(batches)} batches of "
                        f"{cfg.batch_size}; use an instruct target, a lower data.synth.n, or a prompt file"
                    )
                opener = openers[len(batches) % len(openers)]
                header_ids = template.encode(user_header(template) + opener)
                fresh = []
                for text in _sample_batch(target, header_ids, cfg, stop_ids, seed=seed * 1_000_003 + len(batches)):
                    # an opener the target added nothing to is no prompt
                    line = first_line(opener + text) if text.split("\n", 1)[0].strip() else None
                    if line is not None and _dedup_key(line) not in seen:
                        seen.add(_dedup_key(line))
                        fresh.append(line)
                cache.write(json.dumps({"batch": len(batches), "prompts": fresh}, ensure_ascii=False) + "\n")
                cache.flush()
                os.fsync(cache.fileno())
                batches.append(fresh)
                kept.extend(fresh)
                bar.update(min(len(fresh), n - bar.n))
        bar.close()
        return kept[:n]

    return first


def _take(stream: Callable[[int], list[str]], count: int, taken: set[str], skip: int = 0) -> tuple[list[str], int]:
    """``count`` prompts of ``stream`` from position ``skip`` on whose keys are not ``taken`` (then added to it),
    and the position after the last one."""
    if count == 0:  # a domain whose weight gives it no prompt of a small n
        return [], skip
    want = skip + count
    while True:
        lines = stream(want)
        picked: list[str] = []
        for position in range(skip, len(lines)):
            if _dedup_key(lines[position]) not in taken:
                picked.append(lines[position])
                if len(picked) == count:
                    taken.update(_dedup_key(p) for p in picked)
                    return picked, position + 1
        want += count - len(picked)


def _shares(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``weights``: each its floor, the rest one each by largest remainder (ties: listed first)."""
    exact = {name: total * w / sum(weights.values()) for name, w in weights.items()}
    shares = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: shares[name] - exact[name])
    for name in by_remainder[: total - sum(shares.values())]:
        shares[name] += 1
    return shares


def _domain_prompts(
    target: Target,
    cfg: SynthConfig,
    system_prompt: str | None,
    seed: int,
    chat_template: str | None,
    unseen: int = 0,
) -> tuple[list[Conversation], list[Conversation]]:
    """``cfg.n`` prompts split over the domains by weight, and ``unseen`` more, each domain's taken from its stream
    after its training share. The training prompts are chosen first, so asking for unseen ones never changes them."""
    weights = cfg.weights
    streams = {name: _stream(target, cfg, STEERS[name], system_prompt, seed, chat_template) for name in weights}
    taken = evaluation_keys()
    train_shares = _shares(cfg.n, weights)
    train: list[Conversation] = []
    ends: dict[str, int] = {}
    for name, share in train_shares.items():
        lines, ends[name] = _take(streams[name], share, taken)
        category = STEERS[name].category
        train += [Conversation(id=f"{category}-{i:05d}", category=category, turns=[p]) for i, p in enumerate(lines)]
    held: list[Conversation] = []
    for name, count in (_shares(unseen, weights) if unseen else {}).items():
        lines, _ = _take(streams[name], count, taken, skip=ends[name])
        category = STEERS[name].category
        held += [
            Conversation(id=f"{category}-{i:05d}", category=category, turns=[p])
            for i, p in enumerate(lines, start=train_shares[name])
        ]
    return train, held


def synthesize_prompts(
    target: Target,
    cfg: SynthConfig,
    system_prompt: str | None = None,
    seed: int = 0,
    chat_template: str | None = None,
) -> list[Conversation]:
    """``cfg.n`` distinct single-turn prompts written by the target, cached under the shared cache folder."""
    return _domain_prompts(target, cfg, system_prompt, seed, chat_template)[0]


def write_unseen_questions(target: Target, cfg: DataConfig) -> Path | None:
    """Write ``cfg.unseen.count`` synthesized prompts the data leaves out (each domain's after the ones its
    ``cfg.synth.n`` share uses) to ``cfg.unseen.out`` as an eval question file (JSONL ``{"id", "category",
    "turns"}``); returns its path, or None when ``cfg.unseen.out`` is not set."""
    if cfg.unseen.out is None:
        return None
    _, unseen = _domain_prompts(target, cfg.synth, cfg.system_prompt, cfg.seed, cfg.chat_template, cfg.unseen.count)
    path = Path(cfg.unseen.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in unseen:
            f.write(json.dumps({"id": c.id, "category": c.category, "turns": c.turns}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
