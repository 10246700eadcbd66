"""Metrics by hand, and the files one evaluation writes (tiny random target with the real tokenizer)."""

from __future__ import annotations

import json

import pytest

from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.eval import metrics
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions
from draftsmith.eval.runner import evaluate

SUMMARY_KEYS = {
    "drafter", "target", "n_questions", "tau", "tau_per_question", "alpha", "speedup", "tokens_per_s",
    "lossless_mismatches", "by_category",
}  # fmt: skip


def test_tau_and_alpha_by_hand():
    # three steps: 3 accepted of 4 offered, 0 of 4, 1 of 1 (+1 bonus token each)
    appended, accepted, offered = [4, 1, 2], [3, 0, 1], [4, 4, 1]
    assert metrics.tau(appended) == pytest.approx(7 / 3)
    assert metrics.tau_per_question([[1, 1], [3]]) == [1.0, 3.0]
    # k=1: 2 of 3 steps; k=2: step 1 only, of the 2 that offered a 2nd token; k=3: 1/2; k=4: 0/2
    assert metrics.alpha(accepted, offered) == pytest.approx([2 / 3, 1 / 2, 1 / 2, 0.0])
    assert metrics.speedup(100, 10.0, 100, 5.0) == pytest.approx(2.0)
    assert metrics.tau([]) == 0.0


def test_evaluate_writes_the_report_files(tiny_target, tmp_path):
    questions = load_questions(DEFAULT_QUESTIONS)
    picked = [q for q in questions if len(q.turns) == 2][:1] + [q for q in questions if q.category == "rag"][:1]
    summary = evaluate(
        tiny_target, NgramDrafter(), picked, max_new_tokens=6, out=tmp_path, progress=False, drafter_name="ngram"
    )
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_questions"] == 2 and summary["lossless_mismatches"] == 0
    assert summary["tau"] >= 1.0 and len(summary["tau_per_question"]) == 2
    assert set(summary["by_category"]) == {picked[0].category, "rag"}
    assert json.loads((tmp_path / "summary.json").read_text())["drafter"] == "ngram"
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows[0]["turns"]) == 2 and rows[0]["new_tokens"] <= 12
    assert all(sum(r["accept_lengths"]) == r["new_tokens"] - len(r["turns"]) for r in rows)  # prefill tokens
    assert "## rag" in (tmp_path / "report.md").read_text()
    for plot in ("alpha_k.png", "accept_lengths.png", "tau_by_category.png"):
        assert (tmp_path / plot).stat().st_size > 0
