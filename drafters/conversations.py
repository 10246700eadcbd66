"""Conversation records, read the one way every command reads them: training prompts (`data`) and evaluation
questions (`eval`) alike.

Accepted record forms (JSONL, one object a line, or a JSON list in a ``.json`` file):
* Spec-Bench / MT-Bench: ``{"id"|"question_id", "category"?, "turns": [str, ...]}``
* ShareGPT: ``{"id"?, "conversations": [{"from"|"role", "value"|"content"}]}``; only the user turns are kept,
  answers and system turns are dropped.
* a single prompt: ``{"id"?, "category"?, "prompt": str}``
A record without an id is named by where it is (``line-3``); ids must be unique.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftsmith.drafters.errors import DraftsmithError

USER_ROLES = {"human", "user"}
OTHER_ROLES = {"gpt", "assistant", "system", "bing", "chatgpt", "bard", "model"}


@dataclass(frozen=True)
class Conversation:
    """One conversation to regenerate: its user turns only, in order."""

    id: str
    category: str | None
    turns: list[str]


class BadRecord(ValueError):
    """A record that cannot be read; the caller adds where it is."""


def _turns_record(record: Mapping[str, Any], fallback_id: str) -> Conversation:
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise BadRecord('"turns" must be a non-empty list of non-empty strings')
    raw_id = record.get("id", record.get("question_id", fallback_id))
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise BadRecord('"category" must be a string')
    return Conversation(id=str(raw_id), category=category, turns=list(turns))


def _sharegpt_record(record: Mapping[str, Any], fallback_id: str) -> Conversation | None:
    messages = record["conversations"]
    if not isinstance(messages, list):
        raise BadRecord('"conversations" must be a list of messages')
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRecord(f"conversations[{i}] is not an object")
        role = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise BadRecord(f'conversations[{i}] needs string "from"|"role" and "value"|"content"')
        if role.lower() in USER_ROLES:
            if text.strip():
                turns.append(text)
        elif role.lower() not in OTHER_ROLES:
            raise BadRecord(f"conversations[{i}] has unknown role {role!r}")
    if not turns:
        return None
    category = record.get("category")
    return Conversation(id=str(record.get("id", fallback_id)), category=category, turns=turns)


def _prompt_record(record: Mapping[str, Any], fallback_id: str) -> Conversation:
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRecord('"prompt" must be a non-empty string')
    return Conversation(id=str(record.get("id", fallback_id)), category=record.get("category"), turns=[prompt])


def parse_record(record: Any, fallback_id: str) -> Conversation | None:
    """One conversation from one record of any accepted form; None for a conversation with no user turn."""
    if not isinstance(record, Mapping):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        return _turns_record(record, fallback_id)
    if "conversations" in record:
        return _sharegpt_record(record, fallback_id)
    if "prompt" in record:
        return _prompt_record(record, fallback_id)
    raise BadRecord('no "turns", "conversations" or "prompt" field')


def _read_json_records(path: Path) -> Iterable[tuple[str, Any]]:
    """(location, record) pairs: ``line N`` for JSONL, ``item N`` for a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DraftsmithError(f"{path} is not UTF-8 text; pass a JSONL file") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DraftsmithError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        yield from ((f"item {i}", item) for i, item in enumerate(items))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DraftsmithError(f"{path}: line {number}: invalid JSON ({err.msg})") from None


def collect(records: Iterable[tuple[str, Any]], origin: str) -> list[Conversation]:
    conversations: list[Conversation] = []
    seen: dict[str, str] = {}
    skipped = 0
    for location, record in records:
        try:
            conversation = parse_record(record, fallback_id=location.replace(" ", "-"))
        except BadRecord as err:
            raise DraftsmithError(f"{origin}: {location}: {err}") from None
        if conversation is None:
            skipped += 1
            continue
        if conversation.id in seen:
            raise DraftsmithError(
                f"{origin}: {location}: id {conversation.id!r} already used at {seen[conversation.id]}; ids must be "
                "unique (they name the rows)"
            )
        seen[conversation.id] = location
        conversations.append(conversation)
    if skipped:
        warnings.warn(f"{origin}: skipped {skipped} conversation(s) without a user turn", stacklevel=3)
    if not conversations:
        raise DraftsmithError(f"{origin}: no conversation with a user turn")
    return conversations


def read_conversations(path: str | Path, what: str = "prompt file") -> list[Conversation]:
    """Conversations from a Spec-Bench/MT-Bench or ShareGPT JSONL file (or a JSON list)."""
    path = Path(path)
    if path.is_dir():
        raise DraftsmithError(f"{what} {path} is a folder; pass a JSONL file")
    if not path.is_file():
        raise DraftsmithError(f"{what} {path} does not exist; pass the path of a JSONL file")
    return collect(_read_json_records(path), str(path))
