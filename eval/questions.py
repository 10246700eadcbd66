"""Spec-Bench / MT-Bench style question files: JSONL with ``{"id", "category"?, "turns": [str, ...]}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drafters.errors import DraftsmithError

if TYPE_CHECKING:
    import torch

    from drafters.base import Drafter
    from eval.engine import Generation, SpeculativeDecoder

DEFAULT_QUESTIONS = Path(__file__).parent / "questions" / "mini_specbench.jsonl"


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    turns: tuple[str, ...]


def _parse(line: str, where: str) -> Question:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DraftsmithError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DraftsmithError(f"{where}: expected a JSON object with 'turns', got {type(row).__name__}")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise DraftsmithError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    qid = row.get("id", row.get("question_id"))
    if qid is None:
        raise DraftsmithError(f"{where}: missing 'id'")
    return Question(id=str(qid), category=str(row.get("category") or "general"), turns=tuple(turns))


def load_questions(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise DraftsmithError(f"question file {path} not found; pass questions=PATH to a JSONL file")
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                questions.append(_parse(line, f"{path}:{number}"))
    if not questions:
        raise DraftsmithError(f"question file {path} holds no questions")
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise DraftsmithError(f"{path}: question id {q.id!r} appears twice; ids must be unique")
        seen.add(q.id)
    return questions


def across_categories(questions: list[Question], n: int) -> list[Question]:
    """``n`` questions taken round-robin over the categories (in file order), so a small evaluation slice
    sees every category instead of only the first one or two."""
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    picked: list[Question] = []
    for rank in range(max(len(qs) for qs in by_category.values())):
        picked += [qs[rank] for qs in by_category.values() if rank < len(qs)]
    return picked[:n]


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation so far, ending with the assistant's turn to speak (MT-Bench style)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # base models: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_turn(
    decoder: SpeculativeDecoder,
    tokenizer: Any,
    messages: list[dict[str, str]],
    text: str,
    drafter: Drafter,
    max_new_tokens: int,
    rng: torch.Generator | None = None,
) -> tuple[list[int], Generation]:
    """Ask ``text`` as the next user turn of ``messages``, decode the answer and append both to ``messages``
    (each model continues its own history). Returns the prompt's ids and the generation."""
    messages.append({"role": "user", "content": text})
    prompt = prompt_ids(tokenizer, messages)
    generation = decoder.generate(prompt, drafter, max_new_tokens, rng)
    messages.append(
        {"role": "assistant", "content": tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()}
    )
    return prompt, generation
