"""Prompt synthesis: seeded, filtered, deduplicated, cached batch by batch, resumable to the same prompts;
the prompts after the data's make a held-out question file.

The model's sampling is replaced by a seeded draw from a fixed pool of lines (real sampling over a
49k vocabulary is slow on a shared CPU and is exercised by the regeneration benchmark)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from draftsmith.data.config import DataConfig, SynthConfig
from draftsmith.data.synth import STEERS, first_line, synthesize_prompts, user_header, write_unseen_questions
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions

CFG = SynthConfig(n=6, batch_size=4, max_new_tokens=16)
POOL = [f"How do I learn topic number {i} well?" for i in range(12)] + ["ok", "1234567890123", "Tell me a joke, please"]


def pooled_generate(target: Target, pool: list[str] = POOL, prompts: list[str] | None = None) -> Any:
    """Each row: a pool line drawn with torch's global RNG (so seeding decides it), then a newline. ``prompts``
    collects the text each call was given."""
    tok = target.tokenizer

    def generate(input_ids: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        if prompts is not None:
            prompts.append(tok.decode(input_ids[0]))
        rows = []
        for _row in range(input_ids.shape[0]):
            line = pool[int(torch.randint(len(pool), ()))]
            ids = tok(line + "\nAnd more", add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids + [tok.eos_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    return generate


def test_user_header_comes_from_the_chat_template(tiny_target: Target) -> None:
    header = user_header(ChatTemplate(tiny_target.tokenizer))
    assert header.startswith("<|im_start|>system\n") and header.endswith("<|im_end|>\n<|im_start|>user\n")
    custom = user_header(ChatTemplate(tiny_target.tokenizer, system_prompt="Be brief."))
    assert custom == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_synthesis_is_seeded_filtered_cached_and_resumable(
    tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_target.model, "generate", pooled_generate(tiny_target))
    first = synthesize_prompts(tiny_target, CFG, seed=1)
    texts = [c.turns[0] for c in first]
    assert len(set(texts)) == 6 and set(texts) <= set(POOL) - {"ok", "1234567890123"}
    assert [c.id for c in first] == [f"synth-{i:05d}" for i in range(6)]
    (cache,) = (tmp_path / "prompts").iterdir()
    batches = cache.read_text().splitlines()
    assert len(batches) >= 2

    def no_generation(*_: Any, **__: Any) -> None:
        raise AssertionError("cached prompts were synthesized again")

    with monkeypatch.context() as patch:
        patch.setattr(tiny_target.model, "generate", no_generation)
        assert synthesize_prompts(tiny_target, CFG, seed=1) == first

    # Killed after the first batch, while writing the second: the run continues to the same prompts.
    cache.write_text(batches[0] + "\n" + '{"batch": 1, "prom')
    assert synthesize_prompts(tiny_target, CFG, seed=1) == first
    assert cache.read_text().splitlines() == batches

    assert synthesize_prompts(tiny_target, CFG, seed=2) != first
    more = synthesize_prompts(tiny_target, SynthConfig(n=9, batch_size=4, max_new_tokens=16), seed=1)
    assert more[:6] == first  # a larger n extends the same cache


def test_a_target_that_writes_no_usable_prompt_is_stopped(
    tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_target.model, "generate", pooled_generate(tiny_target, ["ok", "1234567890123", ""]))
    with pytest.raises(DraftsmithError, match="only 0 usable prompts"):
        synthesize_prompts(tiny_target, SynthConfig(n=2, batch_size=2, max_new_tokens=16))


def test_unseen_questions_are_the_prompts_after_the_data_s_and_load_as_a_question_file(
    tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_target.model, "generate", pooled_generate(tiny_target))
    out = tmp_path / "held" / "unseen.jsonl"
    cfg = DataConfig(synth=CFG, seed=1, unseen={"count": 3, "out": str(out)})
    assert write_unseen_questions(tiny_target, DataConfig(synth=CFG, seed=1)) is None  # data.unseen.out unset
    assert write_unseen_questions(tiny_target, cfg) == out
    data_prompts = [c.turns[0] for c in synthesize_prompts(tiny_target, CFG, seed=1)]
    questions = load_questions(out)
    assert [q.id for q in questions] == ["synth-00006", "synth-00007", "synth-00008"]
    assert all(q.category == "synth" and len(q.turns) == 1 for q in questions)
    assert not {q.turns[0] for q in questions} & set(data_prompts)
    extended = synthesize_prompts(tiny_target, SynthConfig(n=9, batch_size=4, max_new_tokens=16), seed=1)
    assert [q.turns[0] for q in questions] == [c.turns[0] for c in extended[6:]]


def test_unseen_questions_need_synthesized_prompts() -> None:
    with pytest.raises(DraftsmithError, match=r"data\.unseen\.out must be null unless data\.prompts is \"synth\""):
        DataConfig(prompts="prompts.jsonl", unseen={"out": "unseen.jsonl"})
    with pytest.raises(DraftsmithError, match=r"data\.unseen\.count must be a positive integer"):
        DataConfig(unseen={"count": 0})


def test_domains_steer_their_own_streams_and_split_n_by_weight(
    tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    given: list[str] = []
    monkeypatch.setattr(tiny_target.model, "generate", pooled_generate(tiny_target, prompts=given))
    general = synthesize_prompts(tiny_target, CFG, seed=1)
    given.clear()
    mixed = synthesize_prompts(
        tiny_target, dataclasses.replace(CFG, n=24, domain={"general": 2, "code": 1, "math": 1}), seed=1
    )
    assert [c.category for c in mixed] == ["synth"] * 12 + ["code"] * 6 + ["math"] * 6
    assert mixed[:6] == general  # general's stream and cache are the ones it had before domains existed
    assert [c.id for c in mixed[12:]] == [f"code-{i:05d}" for i in range(6)] + [f"math-{i:05d}" for i in range(6)]
    for c in mixed[12:]:
        assert c.turns[0].startswith(STEERS[c.category].openers)
    # each batch: the domain's system prompt, then the user's message begun with the next opener in turn
    for steer in STEERS["code"], STEERS["math"]:
        steered = [g for g in given if f"system\n{steer.system_prompt}<|im_end|>\n<|im_start|>user\n" in g]
        assert [g.rsplit("user\n", 1)[1] for g in steered] == list(steer.openers[: len(steered)])
        assert len(steered) >= 2
    assert len(list((tmp_path / "prompts").iterdir())) == 3
    code_math = synthesize_prompts(tiny_target, dataclasses.replace(CFG, n=8, domain="code_math"), seed=1)
    assert code_math == mixed[12:16] + mixed[18:22]
    assert synthesize_prompts(tiny_target, dataclasses.replace(CFG, n=1, domain="code_math"), seed=1) == mixed[12:13]


def test_no_prompt_repeats_another_domain_s_or_an_evaluation_question(
    tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    shipped = load_questions(DEFAULT_QUESTIONS)[0].turns[0]
    opener = STEERS["code"].openers[0]
    # general writes the opener's sentence whole; code's stream writes its end after the opener
    pool = [shipped, f"{opener} sorts names.", " sorts names.", *POOL[:8]]
    monkeypatch.setattr(tiny_target.model, "generate", pooled_generate(tiny_target, pool))
    cfg = SynthConfig(n=16, batch_size=4, domain={"general": 1, "code": 1})
    prompts = [c.turns[0] for c in synthesize_prompts(tiny_target, cfg, seed=4)]
    raw = [
        p
        for f in (tmp_path / "prompts").iterdir()
        for line in f.read_text().splitlines()
        for p in json.loads(line)["prompts"]
    ]
    assert shipped in raw and raw.count(f"{opener} sorts names.") == 2  # both happened, and were kept out
    assert len(prompts) == 16 and len(set(prompts)) == 16 and shipped not in prompts
    out = tmp_path / "unseen.jsonl"
    write_unseen_questions(tiny_target, DataConfig(synth=cfg, seed=4, unseen={"count": 4, "out": str(out)}))
    unseen = load_questions(out)
    assert [q.id for q in unseen] == ["synth-00008", "synth-00009", "code-00008", "code-00009"]
    assert not {q.turns[0] for q in unseen} & (set(prompts) | {shipped})


def test_a_line_that_announces_more_lines_is_no_prompt() -> None:
    assert first_line("Translate the following sentence into French:\nHello") is None
    assert first_line("Write a Python function that reverses a list, for example,\n[1, 2]") is None
    assert (
        first_line("Write a Python function that reverses a list.\nmore")
        == "Write a Python function that reverses a list."
    )


@pytest.mark.parametrize("domain", ["poetry", {"code": 1, "poetry": 1}, {"code": 0}, {}, ["code"], {"math": True}])
def test_an_unknown_domain_or_weight_is_one_line(domain: Any) -> None:
    with pytest.raises(DraftsmithError, match=r"data\.synth\.domain must be one of general, code, math, code_math, or"):
        SynthConfig(domain=domain)
