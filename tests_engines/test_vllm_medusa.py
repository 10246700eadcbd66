"""vLLM serves a Medusa drafter in the form drafters/engine_formats.py writes: greedy text identical with and
without it, and vLLM's acceptance beside draftsmith's own engine on the same prompts at the same chain length.

Without ``DRAFTSMITH_VLLM_MEDUSA`` the drafter is a fresh one (it proves loading and losslessness; its heads
repeat the target's next token, so few drafts pass). With ``DRAFTSMITH_VLLM_MEDUSA=EXPORT`` (a trained Medusa
export: its ``engines/vllm`` form, written here if the export lacks it) acceptance must be > 0 and within 10%
(relative) of draftsmith's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.engine_formats import write_vllm_medusa
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.target import Target
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.loading import load_drafter

EXPORT_ENV = "DRAFTSMITH_VLLM_MEDUSA"
DECODE = Path(__file__).with_name("vllm_decode.py")
QUESTIONS = [
    "What is the capital of France?",
    "List the days of the week.",
    "Explain recursion in two sentences.",
    "Write a short poem about rain.",
]
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def medusa(real_target: Target, tmp_path_factory: pytest.TempPathFactory) -> tuple[MedusaDrafter, Path, bool]:
    """The drafter (for draftsmith's engine), its vLLM form, and whether it was trained."""
    export = os.environ.get(EXPORT_ENV)
    if export:
        drafter = load_drafter(export, real_target)
        form = Path(export) / "engines" / "vllm"
        if not (form / "config.json").is_file():
            form = write_vllm_medusa(drafter, tmp_path_factory.mktemp("form"), real_target.model, one_lm_head=True)
        return drafter, form, True
    drafter = MedusaDrafter(MedusaConfig(num_heads=3, num_layers=1))
    drafter.bind(real_target.model)
    form = write_vllm_medusa(drafter.eval(), tmp_path_factory.mktemp("form"), real_target.model, one_lm_head=True)
    return drafter, form, False


def vllm_decode(target: Target, job: Path, out: Path, *extra: str) -> dict:
    """vllm_decode.py in a process of its own: this one already holds the regeneration tests' engine."""
    folder = target.model.name_or_path
    done = subprocess.run([sys.executable, str(DECODE), folder, str(job), str(out), *extra], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(out.read_text())


def test_vllm_serves_the_medusa_form_losslessly(
    real_target: Target, medusa: tuple[MedusaDrafter, Path, bool], tmp_path: Path
) -> None:
    drafter, form, trained = medusa
    chain = json.loads((form / "config.json").read_text())["num_heads"]
    template = ChatTemplate(real_target.tokenizer, None, None)
    prompts = [template.first_prompt(q) for q in QUESTIONS]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"prompts": prompts, "stop_ids": template.stop_ids, "max_new_tokens": MAX_NEW_TOKENS}))

    plain = vllm_decode(real_target, job, tmp_path / "plain.json")
    spec = vllm_decode(real_target, job, tmp_path / "medusa.json", "--medusa", str(form), "--tokens", str(chain))
    assert spec["answers"] == plain["answers"]  # greedy: the drafter changes the speed, never the text
    counters = spec["spec"]
    assert counters["num_drafts"] > 0 and counters["num_draft_tokens"] == chain * counters["num_drafts"]

    # draftsmith's engine on the same prompts, drafting the same chain: each head's top token in turn.
    drafter.set_tree([[0] * depth for depth in range(1, chain + 1)])
    decoder = SpeculativeDecoder(real_target.model, eos_ids=set(template.stop_ids))
    steps = [s for p in prompts for s in decoder.generate(p, drafter, MAX_NEW_TOKENS).steps]
    # vLLM's rate: accepted / drafted, every draft counting all `chain` tokens (a step's `offered` counts only
    # the positions up to the first rejection, so it is not the same denominator).
    drafts = [s for s in steps if s.rows > 1]
    ours = sum(s.accepted for s in drafts) / (chain * len(drafts))
    ours_per_position = [sum(s.accepted > i for s in drafts) / len(drafts) for i in range(chain)]
    theirs = counters["num_accepted_tokens"] / counters["num_draft_tokens"]
    per_position = [n / counters["num_drafts"] for n in counters["num_accepted_tokens_per_pos"]]
    print(
        f"\nMedusa ({'trained: ' + os.environ[EXPORT_ENV] if trained else 'fresh heads'}), chain of {chain}, "
        f"{len(prompts)} prompts, acceptance (accepted / drafted): vLLM {theirs:.3f} (per position "
        f"{', '.join(f'{p:.3f}' for p in per_position)}; {counters['num_drafts']} drafts), draftsmith's engine "
        f"{ours:.3f} (per position {', '.join(f'{p:.3f}' for p in ours_per_position)}; {len(drafts)} drafts)"
    )
    if trained:
        assert counters["num_accepted_tokens"] > 0
        assert abs(theirs - ours) <= 0.1 * ours
