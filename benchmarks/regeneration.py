"""Regeneration throughput: the data pipeline's batched regeneration against one-prompt-at-a-time
``model.generate`` with transformers' default (dynamic) cache, same prompts, greedy, interleaved in one run.

    python benchmarks/regeneration.py --prompts 32      (after `make venv`; else prefix PYTHONPATH=.)

Each chunk of ``--batch-size`` prompts is answered by every arm in turn (the order rotates per chunk), so
load from other processes hits all arms alike. Prints tokens/s per arm, the speedup over the sequential
loop (bar: >= 4x on a 2-core CPU) and the fraction of answers identical to the sequential loop's (bar: >= 95%).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from draftsmith.data.config import DataConfig, SynthConfig
from draftsmith.data.prompts import Conversation, load_prompts
from draftsmith.data.regenerate import regenerate
from draftsmith.data.synth import synthesize_prompts
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.target import Target, load_target


def answers_of(rows: list[dict]) -> dict[str, list[int]]:
    return {r["id"]: [t for t, m in zip(r["input_ids"], r["loss_mask"]) if m] for r in rows}


@torch.inference_mode()
def sequential(target: Target, conversations: list[Conversation], cfg: DataConfig) -> dict[str, list[int]]:
    """The baseline: one prompt per ``generate`` call, transformers' default cache."""
    template = ChatTemplate(target.tokenizer, cfg.system_prompt, cfg.chat_template)
    stops = set(template.stop_ids)
    answers = {}
    for conversation in conversations:
        ids = torch.tensor([template.first_prompt(conversation.turns[0])], device=target.device)
        out = target.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            eos_token_id=template.stop_ids,
            pad_token_id=template.stop_ids[0],
        )
        new = out[0, ids.shape[1] :].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), None)
        answers[conversation.id] = new if end is None else new[: end + 1]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts (keeps the run to minutes)")
    parser.add_argument("--prompt-file", default=None, help="JSONL prompts; default: synthesized by the target")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    args = parser.parse_args()

    torch.manual_seed(0)
    target = load_target(args.target)
    if args.prompt_file:
        conversations = load_prompts(args.prompt_file, limit=args.prompts)
    else:
        conversations = synthesize_prompts(target, SynthConfig(n=args.prompts))
    conversations = [replace(c, turns=c.turns[:1]) for c in conversations]  # the baseline answers one turn
    base = DataConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    arms = {
        "batched static cache (pipeline)": lambda chunk: answers_of(regenerate(target, chunk, base)),
        "batched dynamic cache": lambda chunk: answers_of(
            regenerate(target, chunk, replace(base, cache_implementation="dynamic"))
        ),
        "sequential dynamic cache (baseline)": lambda chunk: sequential(target, chunk, base),
    }
    seconds = dict.fromkeys(arms, 0.0)
    answers: dict[str, dict[str, list[int]]] = {name: {} for name in arms}
    chunks = [conversations[i : i + args.batch_size] for i in range(0, len(conversations), args.batch_size)]
    names = list(arms)
    for k, chunk in enumerate(tqdm(chunks, desc="chunks (all arms)", unit="chunk")):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            answers[name].update(arms[name](chunk))
            seconds[name] += time.perf_counter() - start

    baseline = names[-1]
    rate = {name: sum(map(len, answers[name].values())) / seconds[name] for name in names}
    print(
        f"{len(conversations)} prompts, greedy, max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads (figures from a shared machine: compare ratios, not absolutes)"
    )
    for name in names:
        same = sum(answers[name][c.id] == answers[baseline][c.id] for c in conversations) / len(conversations)
        tokens = sum(map(len, answers[name].values()))
        print(
            f"{name:38s} {tokens:6d} tokens {seconds[name]:8.1f} s {rate[name]:7.1f} tok/s "
            f"x{rate[name] / rate[baseline]:5.2f} vs baseline, identical answers {same:.1%}"
        )


if __name__ == "__main__":
    main()
