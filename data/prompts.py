"""Prompt sources: the user turns of conversations, whose answers the target will regenerate.

Accepted forms: a JSONL/JSON file of conversation records (`drafters.conversations` reads them, as it reads
evaluation questions), or a `datasets` dataset by name or local folder with a ``turns``, ``conversations`` or
``prompt`` column.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from draftsmith.drafters.conversations import Conversation, collect, read_conversations
from draftsmith.drafters.errors import DraftsmithError


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
    return collect(((f"row {i}", row) for i, row in enumerate(loaded)), f"dataset {name_or_path}")


def load_prompts(source: str, split: str = "train", limit: int | None = None) -> list[Conversation]:
    """Conversations from a JSONL/JSON file or a `datasets` source (``synth`` is handled by data.synth)."""
    if "humaneval" in source.lower().replace("_", "").replace("-", ""):
        raise DraftsmithError(
            f"data.prompts={source}: HumanEval is kept for evaluation (draftsmith-eval questions=humaneval), never "
            "trained on; give other prompts"
        )
    path = Path(source)
    if path.suffix in {".jsonl", ".json"}:
        conversations = read_conversations(path)
    else:
        conversations = read_prompt_dataset(source, split)
    return conversations[:limit] if limit else conversations


def prompts_hash(conversations: list[Conversation]) -> str:
    """Content hash of the prompts (ids, categories, turns), independent of where they were read from."""
    payload = json.dumps([asdict(c) for c in conversations], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
