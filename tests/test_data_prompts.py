"""Prompt sources: Spec-Bench/MT-Bench and ShareGPT files, datasets folders, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from draftsmith.data.config import DataConfig
from draftsmith.data.prompts import Conversation, load_prompts, prompts_hash
from draftsmith.data.synth import _read_batches, first_line
from draftsmith.drafters.errors import DraftsmithError


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_spec_bench_records(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
            {"id": "b", "turns": ["Hi"]},
        ],
    )
    assert load_prompts(str(path)) == [
        Conversation(id="81", category="writing", turns=["Write a poem.", "Shorter."]),
        Conversation(id="b", category=None, turns=["Hi"]),
    ]
    assert load_prompts(str(path), limit=1) == load_prompts(str(path))[:1]


def test_sharegpt_keeps_user_turns_only(tmp_path: Path) -> None:
    record = {
        "id": "s1",
        "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "Question one"},
            {"from": "gpt", "value": "Answer one"},
            {"role": "user", "content": "Question two"},
            {"role": "assistant", "content": "Answer two"},
        ],
    }
    no_user = {"conversations": [{"from": "gpt", "value": "orphan answer"}]}
    path = write_jsonl(
        tmp_path / "sharegpt.jsonl", [record, no_user, {"conversations": [{"from": "human", "value": "x"}]}]
    )
    with pytest.warns(UserWarning, match="skipped 1 conversation"):
        conversations = load_prompts(str(path))
    assert conversations == [
        Conversation(id="s1", category=None, turns=["Question one", "Question two"]),
        Conversation(id="line-3", category=None, turns=["x"]),
    ]


def test_sharegpt_json_list(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hello"}]}]))
    assert load_prompts(str(path)) == [Conversation(id="a", category=None, turns=["hello"])]


@pytest.mark.parametrize(
    ("lines", "where", "reason"),
    [
        (['{"turns": ["ok"]}', "{not json"], "line 2", "invalid JSON"),
        (['{"turns": ["ok"]}', "", '{"question": "x"}'], "line 3", 'no "turns", "conversations" or "prompt"'),
        (['{"turns": []}'], "line 1", "non-empty list"),
        (['{"turns": ["a", 3]}'], "line 1", "non-empty list"),
        (['{"conversations": [{"from": "alien", "value": "x"}]}'], "line 1", "unknown role 'alien'"),
        (['{"conversations": [{"from": "human"}]}'], "line 1", "conversations[0] needs"),
        (["[1, 2]"], "line 1", "expected a JSON object"),
        (['{"id": 1, "turns": ["a"]}', '{"id": 1, "turns": ["b"]}'], "line 2", "already used at line 1"),
    ],
)
def test_malformed_file_names_file_line_and_reason(tmp_path: Path, lines: list[str], where: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DraftsmithError) as err:
        load_prompts(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: {where}: ")
    assert reason in message
    assert "\n" not in message


def test_missing_file_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DraftsmithError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DraftsmithError, match="cannot load prompt dataset"):
        load_prompts(str(tmp_path / "no_such_folder"))


def test_datasets_folder_with_prompt_or_conversations_column(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"prompt": "p1"}, {"prompt": "p2"}]).save_to_disk(str(tmp_path / "flat"))
    assert [c.turns for c in load_prompts(str(tmp_path / "flat"))] == [["p1"], ["p2"]]
    assert [c.id for c in load_prompts(str(tmp_path / "flat"))] == ["row-0", "row-1"]
    convs = [{"id": "z", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(convs)}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(str(tmp_path / "dd"), split="test") == [Conversation(id="z", category=None, turns=["q"])]
    with pytest.raises(DraftsmithError, match="no split 'train'"):
        load_prompts(str(tmp_path / "dd"))
    datasets.Dataset.from_list([{"text": "x"}]).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(DraftsmithError, match="needs turns, conversations or prompt"):
        load_prompts(str(tmp_path / "wrong"))


def test_prompts_hash_follows_content_not_location(tmp_path: Path) -> None:
    a = load_prompts(str(write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "turns": ["x"]}])))
    b = load_prompts(str(write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "turns": ["x"]}])))
    c = load_prompts(str(write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "turns": ["y"]}])))
    assert prompts_hash(a) == prompts_hash(b) != prompts_hash(c)


def test_data_config_errors_name_the_key() -> None:
    with pytest.raises(DraftsmithError, match="unknown key.*data.max_tokens"):
        DataConfig.from_mapping({"max_tokens": 3})
    with pytest.raises(DraftsmithError, match="data.synth.n must be a positive integer"):
        DataConfig.from_mapping({"synth": {"n": 0}})
    with pytest.raises(DraftsmithError, match="data.top_p must be in"):
        DataConfig.from_mapping({"top_p": 1.5})
    with pytest.raises(DraftsmithError, match="data.cache_implementation"):
        DataConfig.from_mapping({"cache_implementation": "paged"})
    greedy, sampled = DataConfig(), DataConfig(temperature=0.7)
    assert "seed" not in greedy.generation() and sampled.generation()["seed"] == 0


def test_synth_first_line_filter() -> None:
    assert first_line("How do I bake sourdough bread?\nSure! Here") == "How do I bake sourdough bread?"
    assert first_line("  Hi\nthere") is None  # too short
    assert first_line("1234567890 + 987654321 ?") is None  # no words
    assert first_line("\nWhat follows an empty line?") is None


def test_synth_cache_drops_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "synth.jsonl"
    path.write_text('{"batch": 0, "prompts": ["a"]}\n{"batch": 1, "prompts": ["b"]}\n{"batch": 2, "pro')
    assert _read_batches(path) == [["a"], ["b"]]
    assert path.read_text() == '{"batch": 0, "prompts": ["a"]}\n{"batch": 1, "prompts": ["b"]}\n'
