"""vLLM serving a drafter's engine form beside draftsmith's own engine: the same prompts, greedy, the same draft
chain. The text must be identical with and without the drafter; for a trained drafter vLLM's acceptance must be
> 0 and within 10% (relative) of draftsmith's. Both rates are vLLM's: accepted / drafted tokens, every draft
counting its whole chain (draftsmith's per-step ``offered`` counts only the positions up to the first rejection,
so it is not the same denominator)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from draftsmith.drafters.base import Drafter
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.target import Target
from draftsmith.eval.engine import SpeculativeDecoder

DECODE = Path(__file__).with_name("vllm_decode.py")
QUESTIONS = [
    "What is the capital of France?",
    "List the days of the week.",
    "Explain recursion in two sentences.",
    "Write a short poem about rain.",
]
MAX_NEW_TOKENS = 48


def vllm_decode(target: Target, job: Path, out: Path, *extra: str) -> dict:
    """vllm_decode.py in a process of its own: vLLM holds one engine per process."""
    folder = target.model.name_or_path
    done = subprocess.run([sys.executable, str(DECODE), folder, str(job), str(out), *extra], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(out.read_text())


def compare_with_vllm(
    target: Target, drafter: Drafter, form: Path, method: str, chain: int, label: str, trained: bool, tmp: Path
) -> None:
    """Decode QUESTIONS through vLLM without and with ``form`` (vLLM's ``method``, a chain of ``chain``) and
    through draftsmith's engine with ``drafter`` already set to draft that chain; assert and print as above."""
    template = ChatTemplate(target.tokenizer, None, None)
    prompts = [template.first_prompt(q) for q in QUESTIONS]
    job = tmp / "job.json"
    job.write_text(json.dumps({"prompts": prompts, "stop_ids": template.stop_ids, "max_new_tokens": MAX_NEW_TOKENS}))

    plain = vllm_decode(target, job, tmp / "plain.json")
    spec = vllm_decode(target, job, tmp / "spec.json", "--draft", str(form), "--method", method, "--tokens", str(chain))
    assert spec["answers"] == plain["answers"]  # greedy: the drafter changes the speed, never the text
    counters = spec["spec"]
    assert counters["num_drafts"] > 0 and counters["num_draft_tokens"] == chain * counters["num_drafts"]

    decoder = SpeculativeDecoder(target.model, eos_ids=set(template.stop_ids))
    steps = [s for p in prompts for s in decoder.generate(p, drafter, MAX_NEW_TOKENS).steps]
    drafts = [s for s in steps if s.rows > 1]
    ours = sum(s.accepted for s in drafts) / (chain * len(drafts))
    ours_per_position = [sum(s.accepted > i for s in drafts) / len(drafts) for i in range(chain)]
    theirs = counters["num_accepted_tokens"] / counters["num_draft_tokens"]
    per_position = [n / counters["num_drafts"] for n in counters["num_accepted_tokens_per_pos"]]
    print(
        f"\n{label}, chain of {chain}, {len(prompts)} prompts, acceptance (accepted / drafted): vLLM {theirs:.3f} "
        f"(per position {', '.join(f'{p:.3f}' for p in per_position)}; {counters['num_drafts']} drafts), "
        f"draftsmith's engine {ours:.3f} (per position {', '.join(f'{p:.3f}' for p in ours_per_position)}; "
        f"{len(drafts)} drafts)"
    )
    if trained:
        assert counters["num_accepted_tokens"] > 0
        assert abs(theirs - ours) <= 0.1 * ours
