"""Bad input ends in one DraftsmithError (and, from the CLI, `error: ...` on stderr with exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.sampling import SamplingConfig
from draftsmith.drafters.target import Target, TargetIdentity
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.loading import load_drafter
from draftsmith.eval.questions import DEFAULT_QUESTIONS, across_categories, load_questions

ROOT = Path(__file__).resolve().parents[1]


def fake_target(tokenizer_hash: str = "tok-a", weights_hash: str = "weights-a") -> Target:
    identity = TargetIdentity("tiny", "tests", weights_hash, tokenizer_hash, None)
    return Target(model=tiny_llama(), tokenizer=None, identity=identity)


def export_plain(directory: Path, **extra) -> Path:
    return PlainDrafter().save_pretrained(directory, extra_config=extra)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "eval", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_shipped_questions_cover_six_categories():
    questions = load_questions(DEFAULT_QUESTIONS)
    assert len(questions) == 24
    assert {q.category for q in questions} == {"writing", "translation", "summarisation", "qa", "math", "rag"}
    assert any(len(q.turns) == 2 for q in questions)


def test_a_small_slice_takes_every_category_in_turn():
    questions = load_questions(DEFAULT_QUESTIONS)
    six = across_categories(questions, 6)
    assert len({q.category for q in six}) == 6 and six[0] == questions[0]
    assert [q.id for q in across_categories(questions, 100)] != [q.id for q in questions]
    assert sorted(q.id for q in across_categories(questions, 100)) == sorted(q.id for q in questions)


def test_missing_question_file(tmp_path):
    with pytest.raises(DraftsmithError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"id": 1, "turns": []}', "turns"),
        ('{"id": "a", "turns": ["hi"]}', "'a' already"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "turns": ["hello"]}\n' + line + "\n")
    with pytest.raises(DraftsmithError, match=message) as err:
        load_questions(path)
    assert f"{path}: line 2:" in str(err.value)


def test_a_question_without_id_is_named_by_its_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["hello"]}\n\n{"turns": ["again"], "category": "math"}\n')
    assert [(q.id, q.category) for q in load_questions(path)] == [("line-1", "general"), ("line-3", "math")]


def test_tokenizer_mismatch(tmp_path):
    export = export_plain(tmp_path / "export", tokenizer_hash="tok-b")
    with pytest.raises(DraftsmithError, match="tokenizer"):
        load_drafter(str(export), fake_target(tokenizer_hash="tok-a"))


def test_drafter_for_another_target(tmp_path):
    export = export_plain(
        tmp_path / "export", tokenizer_hash="tok-a", target={"name": "other", "weights_hash": "weights-b"}
    )
    with pytest.raises(DraftsmithError, match="trained for target 'other'"):
        load_drafter(str(export), fake_target())
    assert isinstance(load_drafter(str(export), fake_target(weights_hash="weights-b")), PlainDrafter)


def test_training_free_names_resolve():
    assert load_drafter("ar", fake_target()).config.kind == "ar"
    assert load_drafter("ngram", fake_target()).config.kind == "ngram"


def test_tree_nodes_only_for_drafters_that_draft():
    with pytest.raises(DraftsmithError, match="'ar' has no draft size to set"):
        load_drafter("ar", fake_target(), tree_nodes=5)


def test_bad_settings():
    with pytest.raises(DraftsmithError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(DraftsmithError, match="top_p"):
        SamplingConfig(temperature=1, top_p=0)
    with pytest.raises(DraftsmithError, match="max_new_tokens"):
        SpeculativeDecoder(tiny_llama()).generate([1, 2], PlainDrafter(), 0)


def test_cli_missing_question_file(tmp_path):
    result = run_cli(f"questions={tmp_path / 'missing.jsonl'}", f"out={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: question file")


def test_cli_malformed_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "turns": ["hi"]}) + "\n\n{broken\n")
    result = run_cli(f"questions={path}", f"out={tmp_path / 'out'}")
    assert result.returncode == 2
    assert f"{path}: line 3:" in result.stderr


def test_the_evaluators_dtype_is_a_key_and_the_summary_records_it(tiny_target, tmp_path):
    import json

    from draftsmith.eval.cli import run
    from draftsmith.eval.config import EvalConfig

    folder = tmp_path / "tiny"
    tiny_target.model.save_pretrained(folder)
    tiny_target.tokenizer.save_pretrained(folder)
    config = EvalConfig(
        drafter="ar", target=str(folder), dtype="bfloat16", limit=1, max_new_tokens=2, out=str(tmp_path)
    )
    summary = run(config)
    assert summary["settings"]["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["dtype"] == "bfloat16"
