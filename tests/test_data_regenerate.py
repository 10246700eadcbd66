"""Regeneration and the sharded store: loss masks, manifests, reuse and refused resumes."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from draftsmith.data import build_distilled, load_distilled, read_manifest
from draftsmith.data.config import DataConfig
from draftsmith.data.prompts import Conversation
from draftsmith.data.regenerate import regenerate
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target

ANSWERS = {
    "What is the capital of France?": "The capital of France is Paris.",
    "And of Italy?": "Rome is the capital of Italy.",
    "Count to twenty please.": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20.",
    "Thanks!": "You are welcome!",
}


def scripted_generate(target: Target) -> Any:
    """A stand-in for ``model.generate`` that answers each left-padded prompt's last user turn from ANSWERS."""
    tokenizer = target.tokenizer
    eos = tokenizer.eos_token_id

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = tokenizer.decode([i for i, m in zip(ids, mask) if m])
            question = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.S)[-1]
            answer = (tokenizer(ANSWERS[question], add_special_tokens=False)["input_ids"] + [eos])[:max_new_tokens]
            rows.append(answer + [tokenizer.pad_token_id] * (max_new_tokens - len(answer)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)

    return generate


def spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of ids where mask == 1."""
    runs: list[list[int]] = []
    for i, (token, m) in enumerate(zip(ids, mask)):
        if m and (i == 0 or not mask[i - 1]):
            runs.append([])
        if m:
            runs[-1].append(token)
    return runs


def test_loss_mask_is_exactly_the_target_written_tokens(tiny_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_target.model, "generate", scripted_generate(tiny_target))
    tok = tiny_target.tokenizer
    conversations = [
        Conversation("a", "geo", ["What is the capital of France?", "And of Italy?"]),
        Conversation("b", None, ["Count to twenty please.", "Thanks!"]),
    ]
    max_new = 20  # "Count to twenty" needs more: its first answer is cut, the template closes that turn
    rows = regenerate(tiny_target, conversations, DataConfig(max_new_tokens=max_new, batch_size=2))
    assert [r["id"] for r in rows] == ["a", "b"]
    a, b = rows

    assert [tok.decode(s) for s in spans(a["input_ids"], a["loss_mask"])] == [
        ANSWERS["What is the capital of France?"] + "<|im_end|>",
        ANSWERS["And of Italy?"] + "<|im_end|>",
    ]
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": ANSWERS["What is the capital of France?"]},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": ANSWERS["And of Italy?"]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(a["input_ids"]) == rendered.removesuffix("\n")
    first_prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert a["prompt_len"] == len(tok(first_prompt, add_special_tokens=False)["input_ids"])
    assert a["n_turns"] == 2 and a["n_truncated"] == 0 and a["n_target_tokens"] == sum(a["loss_mask"])

    cut = tok.decode(tok(ANSWERS["Count to twenty please."], add_special_tokens=False)["input_ids"][:max_new])
    assert [tok.decode(s) for s in spans(b["input_ids"], b["loss_mask"])] == [cut, "You are welcome!<|im_end|>"]
    assert b["n_truncated"] == 1
    # The cut answer's turn is closed by the template (mask 0), so the second turn reads a well-formed chat.
    assert "Count to twenty please.<|im_end|>\n<|im_start|>assistant\n" + cut + "<|im_end|>\n<|im_start|>user" in (
        tok.decode(b["input_ids"])
    )


def jsonl(path: Path, n: int, turns: int = 1) -> str:
    path.write_text("".join(json.dumps({"id": f"q{i}", "turns": [f"Question {i}."] * turns}) + "\n" for i in range(n)))
    return str(path)


def small_cfg(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = {
        "prompts": jsonl(tmp_path / "q.jsonl", 5, turns=2),
        "max_new_tokens": 4,
        "batch_size": 2,
        "shard_rows": 2,
        "out": str(tmp_path / "out"),
    }
    return {**cfg, **overrides}


def test_build_writes_shards_and_manifest_then_reuses(tiny_target: Target, tmp_path: Path) -> None:
    folder = build_distilled(small_cfg(tmp_path), tiny_target)
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["n_shards"] == 3
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["target"] == tiny_target.identity.to_dict()
    assert manifest["generation"] == {"max_new_tokens": 4, "greedy": True, "system_prompt": None}
    rows = load_distilled(folder)
    assert rows["id"] == [f"q{i}" for i in range(5)]
    assert manifest["target_tokens"] == sum(sum(m) for m in rows["loss_mask"]) == 5 * 2 * 4
    assert manifest["tokens"] == sum(len(r) for r in rows["input_ids"])
    stamp = (folder / "shards" / "shard-00000").stat().st_mtime_ns
    assert build_distilled(small_cfg(tmp_path), tiny_target) == folder
    assert (folder / "shards" / "shard-00000").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_shared_cache_folder_is_keyed_by_inputs(
    tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path / "cache"))
    first = build_distilled(small_cfg(tmp_path, out=None, limit=2), tiny_target)
    assert first.parent == tmp_path / "cache" / "data"
    assert build_distilled(small_cfg(tmp_path, out=None, limit=2), tiny_target) == first
    assert build_distilled(small_cfg(tmp_path, out=None, limit=2, max_new_tokens=3), tiny_target) != first


def test_mismatched_resume_is_refused(tiny_target: Target, tmp_path: Path) -> None:
    build_distilled(small_cfg(tmp_path), tiny_target)
    with pytest.raises(DraftsmithError, match="different generation"):
        build_distilled(small_cfg(tmp_path, max_new_tokens=5), tiny_target)
    with pytest.raises(DraftsmithError, match="different generation"):
        build_distilled(small_cfg(tmp_path, temperature=0.8), tiny_target)
    with pytest.raises(DraftsmithError, match="different prompts_hash"):
        build_distilled(small_cfg(tmp_path, limit=3), tiny_target)
    other = Target(tiny_target.model, tiny_target.tokenizer, replace(tiny_target.identity, weights_hash="other"))
    with pytest.raises(DraftsmithError, match="different target"):
        build_distilled(small_cfg(tmp_path), other)


def test_incomplete_folder_does_not_load(tiny_target: Target, tmp_path: Path) -> None:
    folder = build_distilled(small_cfg(tmp_path), tiny_target)
    manifest = read_manifest(folder)
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DraftsmithError, match="incomplete.*run the same"):
        load_distilled(folder)
    assert len(load_distilled(folder, allow_incomplete=True)) == 5
    with pytest.raises(DraftsmithError, match="not a distillation data folder"):
        load_distilled(tmp_path)


def test_named_template_for_a_tokenizer_without_one(tiny_target: Target) -> None:
    bare = copy.copy(tiny_target.tokenizer)
    bare.chat_template = None
    with pytest.raises(DraftsmithError, match=r"set target.chat_template \(or data.chat_template\).*vicuna"):
        ChatTemplate(bare)
    template = ChatTemplate(bare, chat_template="vicuna")
    first = bare.decode(template.first_prompt("Hi there"))
    assert first.startswith("A chat between") and first.endswith("questions. USER: Hi there ASSISTANT:")
    eos = bare.eos_token
    assert bare.decode(template.next_prompt(["Hi there"], "More?", answer_stopped=True)) == " USER: More? ASSISTANT:"
    cut = bare.decode(template.next_prompt(["Hi there"], "More?", answer_stopped=False))
    assert cut == f"{eos} USER: More? ASSISTANT:"  # a cut answer's turn is closed by the template
