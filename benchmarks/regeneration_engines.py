"""Regeneration engines: the data pipeline's transformers engine against vLLM's (``data.engine=vllm``), the same
prompts, greedy, in one run.

    make test-engines        (builds .venv-engines, with vLLM), then
    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-engines/bin/python benchmarks/regeneration_engines.py

Both engines answer every prompt through ``data.regenerate.regenerate`` (what ``build_distilled`` calls), each
after a one-prompt warm-up, ``--rounds`` times with the order swapped each round, so load from other processes
hits both alike. Prints each engine's load time, tokens/s, the ratio, and the share of answers identical to the
transformers engine's (greedy answers can differ only where the two engines' float rounding flips a token).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from draftsmith.data.config import DataConfig, SynthConfig
from draftsmith.data.prompts import Conversation, load_prompts
from draftsmith.data.regenerate import AnswerEngine, TransformersEngine, regenerate
from draftsmith.data.synth import synthesize_prompts
from draftsmith.data.vllm_engine import VllmEngine
from draftsmith.drafters.target import load_target


def answers_of(rows: list[dict]) -> dict[str, list[int]]:
    return {r["id"]: [t for t, m in zip(r["input_ids"], r["loss_mask"]) if m] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts (keeps the run to minutes)")
    parser.add_argument("--prompt-file", default=None, help="JSONL prompts; default: synthesized by the target")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="the transformers engine's data.batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    args = parser.parse_args()

    # vLLM's CPU worker pins torch's thread count once it loads (later set_num_threads calls are ignored), so
    # both engines get OMP_NUM_THREADS, set here first.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    target = load_target(args.target)
    if args.prompt_file:
        conversations = load_prompts(args.prompt_file, limit=args.prompts)
    else:
        conversations = synthesize_prompts(target, SynthConfig(n=args.prompts))
    conversations = [replace(c, turns=c.turns[:1]) for c in conversations]  # one turn: a batch per engine call
    cfg = DataConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    warmup = [Conversation("warm-up", None, ["Say hello."])]

    engines: dict[str, AnswerEngine] = {}
    load_seconds: dict[str, float] = {}
    for name, make in (
        ("transformers", lambda: TransformersEngine(target, cfg)),
        ("vllm", lambda: VllmEngine(target, replace(cfg, engine="vllm"))),
    ):
        start = time.perf_counter()
        engines[name] = make()
        regenerate(target, warmup, cfg, engine=engines[name])
        load_seconds[name] = time.perf_counter() - start

    seconds = dict.fromkeys(engines, 0.0)
    answers: dict[str, dict[str, list[int]]] = {}
    names = list(engines)
    for round_ in range(args.rounds):
        for name in names[round_ % 2 :] + names[: round_ % 2]:
            start = time.perf_counter()
            answers[name] = answers_of(regenerate(target, conversations, cfg, engine=engines[name]))
            seconds[name] += time.perf_counter() - start

    rate = {name: args.rounds * sum(map(len, answers[name].values())) / seconds[name] for name in names}
    same = sum(answers["vllm"][c.id] == answers["transformers"][c.id] for c in conversations) / len(conversations)
    print(
        f"{len(conversations)} prompts, greedy, max_new_tokens={args.max_new_tokens}, transformers batch "
        f"{args.batch_size}, vLLM on {target.device} (eager on a CPU), {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads, {target.model.dtype} (a shared machine: compare ratios, not absolutes)"
    )
    for name in names:
        tokens = sum(map(len, answers[name].values()))
        print(
            f"{name:13s} load+warm-up {load_seconds[name]:6.1f} s  {tokens:6d} tokens/round  "
            f"{seconds[name]:7.1f} s  {rate[name]:7.1f} tok/s"
        )
    print(f"vllm / transformers tokens/s: x{rate['vllm'] / rate['transformers']:.2f}")
    print(f"identical greedy answers: {same:.1%} ({round(same * len(conversations))} of {len(conversations)})")


if __name__ == "__main__":
    main()
