"""Decoding benchmark on the embedded target (CPU by default). Every comparison is interleaved in one run.

(a) plain decoding through the engine vs transformers' generate(cache_implementation="static");
(b) engine overhead: wall time outside target forwards and the drafter, as % of a decoding step (bar 10%);
(c) the ngram drafter on input-grounded categories (summarisation, RAG): tau and speedup over plain.

    python benchmarks/decoding.py [--prompts 3] [--rounds 3] [--max-new-tokens 48] [--questions 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.target import load_target
from draftsmith.eval.engine import Generation, SpeculativeDecoder
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions
from draftsmith.eval.runner import evaluate


def engine_vs_generate(
    target, prompts: list[list[int]], max_new: int, rounds: int
) -> tuple[float, float, float, list[Generation]]:
    """Tokens/s of both and the median of their per-pair ratios. Every prompt is decoded ``rounds`` times by
    each, in alternating order (engine first, then generate first), so drift on a shared CPU hits both alike;
    both are forced to produce exactly ``max_new`` tokens."""
    decoder = SpeculativeDecoder(target.model, eos_ids=set())

    def run_engine(prompt: list[int]) -> float:
        generation = decoder.generate(prompt, PlainDrafter(), max_new)
        generations.append(generation)
        return generation.wall_s

    def run_generate(prompt: list[int]) -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            target.model.generate(
                torch.tensor([prompt], device=target.device),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=target.tokenizer.eos_token_id,
            )
        return time.perf_counter() - began

    engine_s, generate_s, ratios, generations = [], [], [], []
    for round_index in range(rounds):
        for i, prompt in enumerate(prompts):
            if (round_index + i) % 2 == 0:
                engine_s.append(run_engine(prompt))
                generate_s.append(run_generate(prompt))
            else:
                generate_s.append(run_generate(prompt))
                engine_s.append(run_engine(prompt))
            ratios.append(generate_s[-1] / engine_s[-1])
    tokens = max_new * len(engine_s)
    return tokens / sum(engine_s), tokens / sum(generate_s), statistics.median(ratios), generations


def overhead_share(generations: list[Generation]) -> float:
    """Engine bookkeeping as a share of decoding time (prefill included in both, as a step is)."""
    wall = sum(g.wall_s for g in generations)
    return sum(g.overhead_s for g in generations) / wall if wall else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="prompts for (a) and (b)")
    parser.add_argument("--rounds", type=int, default=3, help="times (a) decodes each prompt with each method")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--questions", type=int, default=4, help="questions per category for (c)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; batch-1 decoding on a shared CPU stalls with more"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    target = load_target("smollm2-135m-instruct")
    questions = load_questions(DEFAULT_QUESTIONS)
    general = [q for q in questions if q.category in ("writing", "qa")][: args.prompts]
    template = ChatTemplate(target.tokenizer)
    prompts = [template.first_prompt(q.turns[0]) for q in general]

    console.print("(a)+(b) plain decoding: engine vs transformers generate(static cache), interleaved")
    engine_tps, generate_tps, median_ratio, plain_gens = engine_vs_generate(
        target, prompts, args.max_new_tokens, args.rounds
    )

    decoder = SpeculativeDecoder(target.model, eos_ids=set())
    ngram_gens = [decoder.generate(p, NgramDrafter(), args.max_new_tokens) for p in prompts]

    console.print("(c) ngram on summarisation and RAG (plain and ngram interleaved per question)")
    grounded = {c: [q for q in questions if q.category == c][: args.questions] for c in ("summarisation", "rag")}
    results = {
        c: evaluate(target, NgramDrafter(), qs, max_new_tokens=args.max_new_tokens, drafter_name="ngram")
        for c, qs in grounded.items()
    }

    title = f"decoding benchmark, {target.identity.name}, {target.device}, float32, {args.threads} thread(s)"
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("bar / note")
    table.add_row("(a) engine plain tok/s", f"{engine_tps:.2f}", "")
    table.add_row("(a) generate(static) tok/s", f"{generate_tps:.2f}", "")
    table.add_row("(a) engine / generate, all tokens", f"{engine_tps / generate_tps:.2f}x", ">= 1 is at least as fast")
    pairs = f"{args.rounds} rounds x {len(prompts)} prompts"
    table.add_row("(a) engine / generate, median pair", f"{median_ratio:.2f}x", pairs)
    table.add_row("(b) engine overhead, plain", f"{100 * overhead_share(plain_gens):.1f}%", "<= 10%")
    table.add_row("(b) engine overhead, ngram", f"{100 * overhead_share(ngram_gens):.1f}%", "<= 10%")
    for category, summary in results.items():
        table.add_row(f"(c) ngram tau, {category}", f"{summary['tau']:.2f}", "")
        table.add_row(f"(c) ngram speedup, {category}", f"{summary['speedup']:.2f}x", "> 1")
    console.print(table)
    console.print("Timings share the CPU with whatever else runs: only the same-run ratios are meaningful.")


if __name__ == "__main__":
    main()
