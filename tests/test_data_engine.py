"""``data.engine``: the key, the one-line error without vLLM, and regeneration through any answering engine.
vLLM itself is exercised by the engine tier (tests_engines/, `make test-engines`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from draftsmith.data import build_distilled
from draftsmith.data.config import DataConfig
from draftsmith.data.prompts import Conversation
from draftsmith.data.regenerate import regenerate
from draftsmith.data.vllm_engine import VLLM_MISSING
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target


def test_the_engine_key() -> None:
    assert "engine" not in DataConfig().generation()  # the default keeps existing folders' cache keys
    assert DataConfig(engine="vllm").generation()["engine"] == "vllm"  # vLLM's rows are a data set of their own
    with pytest.raises(DraftsmithError, match=r"^data.engine must be transformers or vllm, got 'tgi'$"):
        DataConfig.from_mapping({"engine": "tgi"})


def test_vllm_missing_is_one_line_before_any_model_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(DraftsmithError) as caught:
        build_distilled({"engine": "vllm", "out": str(tmp_path / "out")}, target=None)  # the target is never read
    assert str(caught.value) == VLLM_MISSING
    assert not (tmp_path / "out").exists()


class RecordingEngine:
    """Answers every prompt with its own length (then the stop id), recording the prompts of each call."""

    batch_size = None

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []

    def answer(self, prompts: list[list[int]], stop_ids: list[int]) -> list[tuple[list[int], bool]]:
        self.calls.append(prompts)
        return [([len(p) % 100, stop_ids[0]], True) for p in prompts]


def test_regeneration_through_an_engine_that_batches_itself(tiny_target: Target) -> None:
    conversations = [Conversation(f"c{i}", None, ["Hi?", "More?"][: 1 + i % 2]) for i in range(5)]
    engine = RecordingEngine()
    rows = regenerate(tiny_target, conversations, DataConfig(batch_size=2), engine=engine)
    assert [len(call) for call in engine.calls] == [5, 2]  # each turn's prompts in one call, not batch_size's
    stop = tiny_target.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in rows:
        written = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
        assert written[1::2] == [stop] * row["n_turns"] and row["n_target_tokens"] == 2 * row["n_turns"]
