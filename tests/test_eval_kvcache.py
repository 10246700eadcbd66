"""The rollback cache writes a private counter of transformers' StaticLayer: fail in one line when it moves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_llama
from transformers.cache_utils import StaticLayer

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.eval.kvcache import SUPPORTED_TRANSFORMERS, RollbackCache, check_cache_internals

ROOT = Path(__file__).resolve().parents[1]


def test_installed_transformers_keeps_the_counter_the_cache_writes() -> None:
    try:
        cache = RollbackCache(tiny_llama(), capacity=8)
    except DraftsmithError as err:
        pytest.fail(str(err), pytrace=False)
    cache.write_at(5)
    assert all(int(layer.cumulative_length) == 5 for layer in cache.cache.layers)


def test_a_moved_counter_is_one_line_naming_the_supported_range() -> None:
    layer = StaticLayer(max_cache_len=4)
    del layer.cumulative_length
    with pytest.raises(DraftsmithError, match=re.escape(SUPPORTED_TRANSFORMERS)):
        check_cache_internals(layer)


def test_pyproject_pins_the_same_range() -> None:
    pin = re.search(r'"transformers([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pin == SUPPORTED_TRANSFORMERS
