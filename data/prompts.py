"""Prompt sources: the user turns of conversations, whose answers the target will regenerate.

Accepted forms:
* Spec-Bench / MT-Bench JSONL: ``{"id"|"question_id", "category"?, "turns": [str, ...]}``
* ShareGPT JSONL (or a JSON list): ``{"id"?, "conversations": [{"from"|"role", "value"|"content"}]}``;
  only the user turns are kept, answers and system turns are dropped.
* a `datasets` dataset by name or local folder, with a ``turns``, ``conversations`` or ``prompt`` column.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drafters.errors import DraftsmithError

USER_ROLES = {"human", "user"}
OTHER_ROLES = {"gpt", "assistant", "system", "bing", "chatgpt", "bard", "model"}


@dataclass(frozen=True)
class Conversation:
    """One conversation to regenerate: its user turns only, in order."""

    id: str
    category: str | None
    turns: list[str]


class _BadRecord(ValueError):
    """A record that cannot be read; the caller adds where it is."""


def _turns_record(record: Mapping[str, Any], fallback_id: str) -> Conversation:
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise _BadRecord('"turns" must be a non-empty list of non-empty strings')
    raw_id = record.get("id", record.get("question_id", fallback_id))
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise _BadRecord('"category" must be a string')
    return Conversation(id=str(raw_id), category=category, turns=list(turns))


def _sharegpt_record(record: Mapping[str, Any], fallback_id: str) -> Conversation | None:
    messages = record["conversations"]
    if not isinstance(messages, list):
        raise _BadRecord('"conversations" must be a list of messages')
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _BadRecord(f"conversations[{i}] is not an object")
        role = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise _BadRecord(f'conversations[{i}] needs string "from"|"role" and "value"|"content"')
        if role.lower() in USER_ROLES:
            if text.strip():
                turns.append(text)
        elif role.lower() not in OTHER_ROLES:
            raise _BadRecord(f"conversations[{i}] has unknown role {role!r}")
    if not turns:
        return None
    category = record.get("category")
    return Conversation(id=str(record.get("id", fallback_id)), category=category, turns=turns)


def _prompt_record(record: Mapping[str, Any], fallback_id: str) -> Conversation:
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRecord('"prompt" must be a non-empty string')
    return Conversation(id=str(record.get("id", fallback_id)), category=record.get("category"), turns=[prompt])


def parse_record(record: Any, fallback_id: str) -> Conversation | None:
    """One conversation from one record of any accepted form; None for a conversation with no user turn."""
    if not isinstance(record, Mapping):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        return _turns_record(record, fallback_id)
    if "conversations" in record:
        return _sharegpt_record(record, fallback_id)
    if "prompt" in record:
        return _prompt_record(record, fallback_id)
    raise _BadRecord('no "turns", "conversations" or "prompt" field')


def _read_json_records(path: Path) -> Iterable[tuple[str, Any]]:
    """(location, record) pairs: ``line N`` for JSONL, ``item N`` for a JSON list."""
    text = path.read_text(encoding="utf-8")
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


def _collect(records: Iterable[tuple[str, Any]], origin: str) -> list[Conversation]:
    conversations: list[Conversation] = []
    seen: dict[str, str] = {}
    skipped = 0
    for location, record in records:
        try:
            conversation = parse_record(record, fallback_id=location.replace(" ", "-"))
        except _BadRecord as err:
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


def read_prompt_file(path: str | Path) -> list[Conversation]:
    """Conversations from a Spec-Bench/MT-Bench or ShareGPT JSONL file (or a ShareGPT JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise DraftsmithError(f"prompt file {path} does not exist")
    return _collect(_read_json_records(path), str(path))


def read_prompt_dataset(name_or_path: str, split: str = "train") -> list[Conversation]:
    """Conversations from a `datasets` dataset: a folder written by save_to_disk, a data folder, or a name."""
    import datasets

    path = Path(name_or_path)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DraftsmithError(f"{path} has no split {split!r}; splits: {', '.join(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name_or_path, split=split)
    except DraftsmithError:
        raise
    except Exception as err:  # datasets raises many types for "not found / unreachable / bad split"
        raise DraftsmithError(
            f"cannot load prompt dataset {name_or_path!r} split {split!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); give a JSONL file or a local dataset folder"
        ) from None
    columns = set(loaded.column_names)
    if not columns & {"turns", "conversations", "prompt"}:
        raise DraftsmithError(
            f"prompt dataset {name_or_path!r} has columns {sorted(columns)}; it needs turns, conversations or prompt"
        )
    return _collect(((f"row {i}", row) for i, row in enumerate(loaded)), f"dataset {name_or_path}")


def load_prompts(source: str, split: str = "train", limit: int | None = None) -> list[Conversation]:
    """Conversations from a JSONL/JSON file or a `datasets` source (``synth`` is handled by data.synth)."""
    path = Path(source)
    if path.suffix in {".jsonl", ".json"}:
        conversations = read_prompt_file(path)
    else:
        conversations = read_prompt_dataset(source, split)
    return conversations[:limit] if limit else conversations


def prompts_hash(conversations: list[Conversation]) -> str:
    """Content hash of the prompts (ids, categories, turns), independent of where they were read from."""
    payload = json.dumps([asdict(c) for c in conversations], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
