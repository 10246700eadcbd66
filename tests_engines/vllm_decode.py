"""Greedy decoding through vLLM in a process of its own (vLLM holds one engine per process), with or without a
drafter in an engine form (Medusa in vLLM's form, EAGLE-3 in the speculators form); the engine tier's tests run
it once per engine.

    python tests_engines/vllm_decode.py TARGET_FOLDER PROMPTS_JSON OUT_JSON [--draft DIR --method M --tokens K]

PROMPTS_JSON: {"prompts": [[ids], ...], "stop_ids": [...], "max_new_tokens": N}. OUT_JSON gets the answers'
ids, and with a drafter vLLM's speculative counters: drafts, draft tokens, accepted tokens (per position too).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def spec_counters(llm: Any) -> dict[str, Any]:
    """vLLM's speculative-decoding counters, summed over the run."""
    from vllm.v1.metrics.reader import Counter, Vector

    counters: dict[str, Any] = {}
    for metric in llm.get_metrics():
        name = metric.name.removeprefix("vllm:spec_decode_")
        if isinstance(metric, Counter) and metric.name.startswith("vllm:spec_decode_"):
            counters[name] = metric.value
        elif isinstance(metric, Vector) and metric.name.startswith("vllm:spec_decode_"):
            counters[name] = list(metric.values)
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--draft", default=None, help="a drafter in an engine form (engines/NAME of an export)")
    parser.add_argument("--method", default="medusa", choices=("medusa", "eagle3"), help="vLLM's method for it")
    parser.add_argument("--tokens", type=int, default=3, help="num_speculative_tokens: the draft chain's length")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(args.prompts).read_text())
    speculative = (
        {"method": args.method, "model": args.draft, "num_speculative_tokens": args.tokens} if args.draft else None
    )
    llm = LLM(
        model=args.target,
        dtype="float32",
        enforce_eager=True,
        compilation_config={"mode": 0},
        speculative_config=speculative,
        disable_log_stats=False,  # the speculative counters
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=job["max_new_tokens"],
        stop_token_ids=job["stop_ids"],
        ignore_eos=True,
        detokenize=False,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
    result = {"answers": [list(o.outputs[0].token_ids) for o in outputs], "spec": spec_counters(llm)}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
