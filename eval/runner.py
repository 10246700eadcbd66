"""Evaluate a drafter against its target on a question set: plain and speculative decoding interleaved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from draftsmith.drafters.base import Drafter
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.sampling import SamplingConfig
from draftsmith.drafters.target import Target
from draftsmith.eval import report
from draftsmith.eval.cost_model import CostModel, DraftShaper, measured_cost, save_cost
from draftsmith.eval.drift import Turn, adapter_drift
from draftsmith.eval.engine import Generation, SpeculativeDecoder, eos_token_ids
from draftsmith.eval.questions import Dialogue, Question
from draftsmith.eval.summary import summarize


def _turn_pair(
    decoder: SpeculativeDecoder,
    template: ChatTemplate,
    drafter: Drafter,
    plain: Drafter,
    question: Question,
    max_new_tokens: int,
    seed: int,
    planner: DraftShaper | None,
) -> tuple[list[Generation], list[str], list[Generation]]:
    """Plain then speculative, turn by turn, each with its own conversation history and same-seeded RNG;
    ``planner`` sizes the speculative side's drafts."""
    plain_gens: list[Generation] = []
    spec_gens: list[Generation] = []
    answers: list[str] = []
    plain_side, spec_side = Dialogue(template), Dialogue(template)
    plain_rng = torch.Generator().manual_seed(seed)
    spec_rng = torch.Generator().manual_seed(seed)
    for turn in question.turns:
        for side, runner, rng, store, sizer in (
            (plain_side, plain, plain_rng, plain_gens, None),
            (spec_side, drafter, spec_rng, spec_gens, planner),
        ):
            store.append(side.answer(decoder, turn, runner, max_new_tokens, rng, sizer)[1])
        answers.append(template.tokenizer.decode(spec_gens[-1].tokens, skip_special_tokens=True).strip())
    return plain_gens, answers, spec_gens


def _row(question: Question, answers: list[str], plain: list[Generation], spec: list[Generation], greedy: bool) -> dict:
    steps = [s for g in spec for s in g.steps]
    return {
        "id": question.id,
        "category": question.category,
        "turns": answers,
        "new_tokens": sum(len(g.tokens) for g in spec),
        "wall_time": sum(g.wall_s for g in spec),
        "accept_lengths": [s.appended for s in steps],
        "accepted": [s.accepted for s in steps],
        "offered": [s.offered for s in steps],
        "plain_new_tokens": sum(len(g.tokens) for g in plain),
        "plain_wall_time": sum(g.wall_s for g in plain),
        "target_time": sum(g.target_s for g in spec),
        "drafter_time": sum(g.drafter_s for g in spec),
        "lossless": all(p.tokens == s.tokens for p, s in zip(plain, spec, strict=True)) if greedy else None,
        "identical_turns": sum(p.tokens == s.tokens for p, s in zip(plain, spec, strict=True)) if greedy else None,
    }


def evaluate(
    target: Target,
    drafter: Drafter,
    questions: list[Question],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    out: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    top_p: float = 1.0,
    drafter_name: str | None = None,
    original: Sequence[Sequence[Turn]] | None = None,
    tree_nodes: str | None = None,
    cost: CostModel | None = None,
) -> dict[str, Any]:
    """Decode every question plainly and speculatively (interleaved per turn) and summarise (docs/design.md keys).

    ``tree_nodes="auto"``: a `DraftShaper` sizes every draft by the measured cost model (``cost``, else the
    target's cached one, measured on first use); otherwise the drafter drafts as configured.
    ``original``: the original target's greedy answers to ``questions`` (`eval.drift.greedy_turns`) when
    ``target`` is an adapted one (Medusa-2); the summary then gets ``adapter_drift``.
    With ``out``, also write results.jsonl, summary.json, report.md and PNG plots there."""
    if not questions:
        raise DraftsmithError("no questions to evaluate; check the question file and limit")
    if max_new_tokens < 1:
        raise DraftsmithError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = SamplingConfig(temperature=temperature, top_p=top_p)
    decoder = SpeculativeDecoder(target.model, eos_ids=eos_token_ids(target.model, target.tokenizer), sampling=sampling)
    plain = PlainDrafter()
    template = ChatTemplate(target.tokenizer)
    name = drafter_name or drafter.config.kind
    shaper, cost_file = None, None
    if tree_nodes == "auto" and drafter.max_draft_nodes() != 0:  # a drafter that never drafts has nothing to size
        if cost is None:
            cost, cost_file = measured_cost(target)
        shaper = DraftShaper(drafter, cost, drafter_s=cost.drafter_s.get(name))
    elif tree_nodes not in (None, "auto"):
        raise DraftsmithError(f"tree_nodes={tree_nodes!r}: evaluate takes 'auto' or None (set a size on the drafter)")
    rows = []
    plain_answers = []
    bar = tqdm(questions, desc=f"eval {name}", unit="q", disable=not progress)
    try:
        for index, question in enumerate(bar):
            plain_gens, answers, spec_gens = _turn_pair(
                decoder, template, drafter, plain, question, max_new_tokens, seed * 100_003 + index, shaper
            )
            rows.append(_row(question, answers, plain_gens, spec_gens, sampling.greedy))
            plain_answers.append([g.tokens for g in plain_gens])
            steps = [n for row in rows for n in row["accept_lengths"]]
            bar.set_postfix(tau=f"{sum(steps) / max(len(steps), 1):.2f}")
    finally:  # the drafter gets its own tree back whatever happened (training exports it next)
        if shaper is not None:
            shaper.finish()
    dtype = str(next(target.model.parameters()).dtype).removeprefix("torch.")
    settings = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "dtype": dtype,
    }
    if shaper is None:
        settings.update(drafter.draft_shape())
    else:
        settings["draft_shape"] = shaper.summary(cost_file)
        settings["tree_nodes"] = "auto"
        if cost_file is not None and shaper.draft_s is not None:  # the next run starts from what this one measured
            cost.drafter_s[name] = shaper.draft_s
            save_cost(cost, cost_file)
    summary = summarize(rows, name, target.identity.name, settings)
    if original is not None:
        summary["adapter_drift"] = adapter_drift(target.model, original, plain_answers if sampling.greedy else None)
    if out is not None:
        report.write(Path(out), summary, rows)
    return summary
