"""Drafting cost per decoding step at the embedded target's sizes (hidden 576, vocab 49152).

Amphista keeps an incremental KV cache for its causal adaptation layers; the baseline beside it recomputes
them over the whole prefix at every step. Each round times, interleaved: one Medusa step, one incremental
Amphista step, one Amphista step from scratch. Prints medians and ratios measured in this one run.

    .venv/bin/python benchmarks/drafting_cost.py --prefix 800 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from draftsmith.drafters.amphista import AmphistaConfig, AmphistaDrafter
from draftsmith.drafters.base import DecodeState
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.target import load_target


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_target("smollm2-135m-instruct").model
    medusa = MedusaDrafter(MedusaConfig(tree_nodes=15))
    amphista = AmphistaDrafter(AmphistaConfig(tree_nodes=15))
    for drafter in (medusa, amphista):
        drafter.bind(model)
        drafter.eval()
    generator = torch.Generator().manual_seed(0)
    hidden_size, vocab = model.config.hidden_size, model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.prefix + args.rounds + 1,), generator=generator)
    hidden = torch.randn(args.prefix + args.rounds, hidden_size, generator=generator)

    def state(length: int, new_from: int) -> DecodeState:
        return DecodeState(tokens=tokens[:length], prompt_len=8, hidden={-1: hidden[: length - 1]}, new_from=new_from)

    def from_scratch(length: int) -> None:
        amphista.reset()
        amphista.propose(state(length, 0))

    amphista.propose(state(args.prefix, 0))  # fills the incremental cache up to the prefix
    times: dict[str, list[float]] = {"medusa": [], "amphista": [], "amphista_scratch": []}
    for step in range(args.rounds):
        length = args.prefix + step + 1
        step_state = state(length, length - 2)
        times["medusa"].append(timed(lambda: medusa.propose(step_state)))  # noqa: B023 - called at once
        times["amphista"].append(timed(lambda: amphista.propose(step_state)))  # noqa: B023
        times["amphista_scratch"].append(timed(lambda: from_scratch(length)))  # noqa: B023
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"median ms per drafting step at a {args.prefix}-token prefix ({args.threads} threads):")
    for name, value in median.items():
        print(f"  {name:18s} {1000 * value:8.1f}")
    print(f"amphista from scratch / incremental: {median['amphista_scratch'] / median['amphista']:.1f}x")
    print(f"amphista incremental / medusa:       {median['amphista'] / median['medusa']:.1f}x")


if __name__ == "__main__":
    main()
