"""The cost model against the clock: per draft shape, measured tokens/s beside the cost model's prediction.

Every question's first turn is decoded once per shape, the shapes interleaved question by question (drift on a
shared CPU hits them alike): plain decoding (0 nodes), the drafter's greedy tree at fixed sizes, and
``tree_nodes=auto``. Tokens/s count the decoding steps only (the prefill is the same for every shape). Two
predictions per shape, both from the cached cost model (`draftsmith-eval profile=true` measures it):

- ``pred (tau)``: the measured tokens per step over the predicted step times (t_draft + t_verify(rows) per
  step): checks the cost curve alone;
- ``pred (E)``: the acceptance model's E[appended | n] (training's accuracies) over the predicted step time:
  what `DraftShaper` maximises; only for drafters with one (Medusa, Amphista, ParallelSpec) at fixed sizes.

    .venv/bin/python benchmarks/cost_model.py --drafter outputs/demo/export --limit 8 --threads 1

``--engine-vs-bare`` adds the engine's verification step against a bare transformers forward of as many tokens
(the tree path's own overhead).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache, PreTrainedModel

from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.target import TargetSpec, load_target
from draftsmith.eval.cost_model import AdaptiveTree, CostModel, DraftShaper, measured_cost, profile_target
from draftsmith.eval.engine import Generation, SpeculativeDecoder
from draftsmith.eval.loading import load_drafter
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions


def step_times(generations: list[Generation]) -> tuple[int, float, list[tuple[int, float]]]:
    """Tokens appended by the steps, their seconds, and (rows, draft seconds) of every step."""
    steps = [s for g in generations for s in g.steps]
    seconds = sum(s.draft_s + s.verify_s for s in steps)
    return sum(s.appended for s in steps), seconds, [(s.rows, s.draft_s) for s in steps]


def predicted_step_s(cost: CostModel, steps: list[tuple[int, float]], capacity: int, draft_s: float) -> float:
    """Mean predicted seconds of the steps taken: the drafter's cost where it was asked, plus t_verify(rows)."""
    return statistics.mean((draft_s if asked > 0 else 0.0) + cost.verify(rows, capacity) for rows, asked in steps)


def engine_against_bare(model: PreTrainedModel, key: dict, rows: list[int], context: int, repeats: int) -> Table:
    """The engine's verification step (tree mask, rollback cache, acceptance) against a bare forward of as many new
    tokens over a transformers DynamicCache of the same context: what the engine's tree path costs on top."""
    engine = profile_target(model, key, rows=rows, contexts=(context,), repeats=repeats).verify_s[0]
    prompt = torch.randint(0, int(model.config.vocab_size), (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    table = Table(title=f"engine step vs bare forward at a {context}-token context (median of {repeats})")
    for column in ("rows", "engine ms", "bare ms", "engine / bare"):
        table.add_column(column, justify="right")
    with torch.inference_mode():
        model(input_ids=prompt.to(model.device), past_key_values=cache, use_cache=True)
        for q, engine_s in zip(rows, engine, strict=True):
            times = []
            for _ in range(repeats + 1):
                began = time.perf_counter()
                model(input_ids=prompt[:, :q].to(model.device), past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - began)
                cache.crop(-q)
            bare = statistics.median(times[1:])
            table.add_row(str(q), f"{1000 * engine_s:.1f}", f"{1000 * bare:.1f}", f"{engine_s / bare:.2f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", required=True, help="an export folder, a Hub id or a drafter kind")
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--questions", default=None, help="Spec-Bench JSONL (default: the shipped questions)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sizes", default="1,2,3,4,6,8,12,16", help="fixed draft sizes besides plain and auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the preset's)")
    parser.add_argument("--engine-vs-bare", action="store_true", help="also time engine step vs bare forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = TargetSpec.from_any(args.target)
    target = load_target(spec if args.dtype is None else dataclasses.replace(spec, dtype=args.dtype))
    drafter = load_drafter(args.drafter, target)
    cost, path = measured_cost(target)
    template = ChatTemplate(target.tokenizer)
    questions = load_questions(args.questions or DEFAULT_QUESTIONS)[: args.limit]
    prompts = [template.first_prompt(q.turns[0]) for q in questions]

    adaptive = isinstance(drafter, AdaptiveTree)
    sizes = [int(n) for n in args.sizes.split(",")] if adaptive else []
    shapes = ["plain", *(str(n) for n in sizes), "auto"]
    decoder = SpeculativeDecoder(target.model, eos_ids=set())
    shaper = DraftShaper(drafter, cost, drafter_s=cost.drafter_s.get(args.drafter))
    runs: dict[str, list[Generation]] = {shape: [] for shape in shapes}
    for prompt in prompts:
        for shape in shapes:
            if shape == "plain":
                generation = decoder.generate(prompt, PlainDrafter(), args.max_new_tokens)
            elif shape == "auto":
                generation = decoder.generate(prompt, drafter, args.max_new_tokens, planner=shaper)
                shaper.finish()
            else:
                drafter.shape_draft(int(shape))
                generation = decoder.generate(prompt, drafter, args.max_new_tokens)
                drafter.shape_draft(None)
            runs[shape].append(generation)

    capacity = decoder.cache.capacity
    drafted = [s.draft_s for shape in shapes[1:] for g in runs[shape] for s in g.steps if s.draft_s > 0]
    draft_s = cost.drafter_s.get(args.drafter, statistics.median(drafted) if drafted else 0.0)
    if adaptive:
        drafter.forget_acceptance()
        expected = drafter.expected_appended(max(sizes))
    table = Table(title=f"cost model vs clock: {args.drafter} on {target.identity.name}, cost model {path}")
    for column in ("shape", "tau", "tok/s measured", "pred (tau)", "ratio", "E", "pred (E)", "ratio (E)"):
        table.add_column(column, justify="right")
    for shape in shapes:
        tokens, seconds, steps = step_times(runs[shape])
        measured = tokens / seconds if seconds else 0.0
        tau = tokens / len(steps) if steps else 0.0
        # plain decoding's steps time a PlainDrafter (about nothing): the learned drafter's cost is not theirs
        per_step = predicted_step_s(cost, steps, capacity, 0.0 if shape == "plain" else draft_s)
        by_tau = tau / per_step
        cells = [shape, f"{tau:.2f}", f"{measured:.1f}", f"{by_tau:.1f}", f"{measured / by_tau:.2f}"]
        if shape.isdigit() or shape == "plain":
            n = 0 if shape == "plain" else int(shape)
            e = expected[min(n, len(expected) - 1)] if adaptive else 1.0
            by_e = e / per_step
            cells += [f"{e:.2f}", f"{by_e:.1f}", f"{measured / by_e:.2f}"]
        else:
            cells += ["", "", ""]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if args.engine_vs_bare:
        console.print(engine_against_bare(target.model, cost.key, [1, 4, 8, 16], 300, 7))
    console.print(
        f"t_draft {1000 * draft_s:.1f} ms, cache {capacity} slots, plain step predicted "
        f"{1000 * cost.verify(1, capacity):.1f} ms; auto chose {dict(sorted(shaper.chosen.items()))} (nodes: steps). "
        "ratio = measured / predicted; only same-run figures compare."
    )


if __name__ == "__main__":
    main()
