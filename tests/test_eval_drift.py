"""Adapter drift (Medusa-2): how far an adapted target is from the original one, against hand computations.

On the real target: a tiny random model answers every prompt with the same token, so nothing could differ."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.drafters.target import Target
from draftsmith.eval.drift import adapter_drift, greedy_turns
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions
from draftsmith.eval.runner import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def two_questions() -> list:
    questions = load_questions(DEFAULT_QUESTIONS)
    return [q for q in questions if len(q.turns) == 2][:1] + [q for q in questions if q.category == "rag"][:1]


def moved(target: Target, scale: float = 0.01, seed: int = 1) -> Target:
    """A copy of ``target`` whose MLPs moved a little: the stand-in for a merged adapter."""
    model = copy.deepcopy(target.model)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        weight = layer.mlp.down_proj.weight
        weight += scale * torch.randn(weight.shape, generator=generator)
    return Target(model=model, tokenizer=target.tokenizer, identity=target.identity)


def answers(turns: list) -> list[list[list[int]]]:
    return [[turn.tokens for turn in question] for question in turns]


def test_agreement_and_identical_answers_by_hand(real_target):
    questions = two_questions()
    original = greedy_turns(real_target, questions, 8)
    assert [len(q) for q in original] == [2, 1] and all(turn.tokens for q in original for turn in q)
    assert adapter_drift(real_target.model, original, answers(original)) == {
        "top1_agreement": 1.0,
        "identical_answers": 1.0,
    }

    adapted = moved(real_target)
    hits = total = 0
    with torch.no_grad():
        for turn in (turn for question in original for turn in question):
            for i, token in enumerate(turn.tokens):  # one full forward per prefix: no slicing to get wrong
                logits = adapted.model(torch.tensor([turn.prompt + turn.tokens[:i]])).logits[0, -1]
                hits += int(logits.argmax()) == token
                total += 1
    own = answers(greedy_turns(adapted, questions, 8))
    identical = [a == b for q_own, q_orig in zip(own, answers(original)) for a, b in zip(q_own, q_orig)]
    drift = adapter_drift(adapted.model, original, own)
    assert 0 < hits < total
    assert drift["top1_agreement"] == pytest.approx(hits / total)
    assert drift["identical_answers"] == pytest.approx(sum(identical) / len(identical))
    assert drift["identical_answers"] < 1.0
    assert adapter_drift(adapted.model, original, None)["identical_answers"] is None  # sampled runs


def test_evaluate_reports_the_drift_of_an_adapted_target(real_target, tmp_path):
    questions = two_questions()
    original = greedy_turns(real_target, questions, 6)
    adapted = moved(real_target)
    summary = evaluate(adapted, NgramDrafter(), questions, max_new_tokens=6, out=tmp_path, progress=False,
                       original=original)  # fmt: skip
    expected = adapter_drift(adapted.model, original, answers(greedy_turns(adapted, questions, 6)))
    assert summary["adapter_drift"] == pytest.approx(expected)
    assert json.loads((tmp_path / "summary.json").read_text())["adapter_drift"] == pytest.approx(expected)
    assert "LoRA-adapted (Medusa-2)" in (tmp_path / "report.md").read_text()


def test_no_drift_without_an_original(tiny_target):
    summary = evaluate(tiny_target, NgramDrafter(), two_questions(), max_new_tokens=4, progress=False)
    assert "adapter_drift" not in summary
