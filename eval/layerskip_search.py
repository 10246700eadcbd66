"""Choose which decoder layers the ``layerskip`` drafter skips: a small search on measured speed.

Start by skipping every other middle layer, then local search: flip one or two layers (never the first or
the last) and keep the change when greedy speculative decoding of a few prompts gets faster (tokens/s).
The result is saved as JSON per target (keyed by its weights hash) and reused by later runs.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from drafters.target import Target, cache_root
from eval.engine import SpeculativeDecoder, eos_token_ids
from eval.layerskip_drafter import LayerSkipConfig, LayerSkipDrafter, decoder_layers
from eval.questions import DEFAULT_QUESTIONS, load_questions, prompt_ids


def measure(decoder: SpeculativeDecoder, drafter: LayerSkipDrafter, prompts: list[list[int]], max_new: int) -> float:
    """Tokens per second of greedy speculative decoding over the prompts."""
    tokens, began = 0, time.perf_counter()
    for prompt in prompts:
        tokens += len(decoder.generate(prompt, drafter, max_new).tokens)
    return tokens / (time.perf_counter() - began)


def search_skip_layers(
    decoder: SpeculativeDecoder,
    prompts: list[list[int]],
    *,
    budget: int = 8,
    max_new_tokens: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[int], float]:
    """Return the fastest skip set found in ``budget`` measured trials and its tokens/s."""
    n = len(decoder_layers(decoder.model))
    middle = list(range(1, n - 1)) if n >= 3 else [n - 1]  # too few layers to keep both ends: the last
    rng = random.Random(seed)

    def speed(skip: list[int]) -> float:
        return measure(decoder, LayerSkipDrafter(LayerSkipConfig(skip_layers=skip)), prompts, max_new_tokens)

    best = sorted(middle[::2])
    best_speed = speed(best)
    for _ in tqdm(range(budget - 1), desc="layerskip search", unit="trial", disable=not progress):
        candidate = set(best)
        for layer in rng.sample(middle, k=min(len(middle), rng.choice((1, 2)))):
            candidate ^= {layer}
        if not candidate:
            continue
        trial = sorted(candidate)
        trial_speed = speed(trial)
        if trial_speed > best_speed:
            best, best_speed = trial, trial_speed
    return best, best_speed


def skip_file(target: Target) -> Path:
    return cache_root() / "layerskip" / f"{target.identity.name}-{target.identity.weights_hash[:16]}.json"


def load_or_search(target: Target, *, budget: int = 8, progress: bool = True) -> LayerSkipDrafter:
    """The layerskip drafter for this target: the saved skip set, or a fresh search saved for next time."""
    path = skip_file(target)
    if path.is_file():
        saved = json.loads(path.read_text())
        drafter = LayerSkipDrafter(LayerSkipConfig(skip_layers=saved["skip_layers"]))
        drafter.bind(target.model)
        return drafter
    questions = load_questions(DEFAULT_QUESTIONS)
    picked = [q for q in questions if q.category in ("writing", "qa", "summarisation")][::2][:2]
    prompts = [prompt_ids(target.tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in picked]
    decoder = SpeculativeDecoder(target.model, eos_ids=eos_token_ids(target.model, target.tokenizer))
    with torch.no_grad():
        skip, tokens_per_s = search_skip_layers(decoder, prompts, budget=budget, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"skip_layers": skip, "tokens_per_s": tokens_per_s, "budget": budget, "target": target.identity.name}
    path.write_text(json.dumps(record, indent=2) + "\n")
    drafter = LayerSkipDrafter(LayerSkipConfig(skip_layers=skip))
    drafter.bind(target.model)
    return drafter
