"""Targets that cannot be had end in one quick, clear DraftsmithError (no network needed)."""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import load_target


def test_unreachable_hub_target_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(DraftsmithError, match="could not get Hub repo 'someone/not-downloaded-model'") as err:
        load_target({"name": "remote", "source": "someone/not-downloaded-model"})
    assert time.perf_counter() - start < 10
    assert "local folder" in str(err.value) and "\n" not in str(err.value)


def test_missing_local_folder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DraftsmithError, match="not-there"):
        load_target(str(tmp_path / "not-there"))


def test_folder_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftsmithError, match="is not a transformers model"):
        load_target(str(tmp_path / "empty"))
