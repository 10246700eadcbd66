"""``data.engine=vllm`` on the embedded target: the transformers engine's rows and manifest, its resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from draftsmith.data import build_distilled, load_distilled, read_manifest
from draftsmith.data.store import ShardStore
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target

CONVERSATIONS = [
    ["What is the capital of France?", "And of Italy?"],
    ["Write a haiku about the sea."],
    ["Explain recursion in one sentence.", "Give an example in Python."],
    ["Name three primary colours."],
    ["How many legs does a spider have?"],
    ["Suggest a name for a cat.", "Why that one?"],
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "q.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "turns": t}) + "\n" for i, t in enumerate(CONVERSATIONS)))
    return str(path)


def data_cfg(prompts: str, out: Path, **overrides: Any) -> dict[str, Any]:
    return {"prompts": prompts, "max_new_tokens": 24, "shard_rows": 2, "batch_size": 4, "out": str(out), **overrides}


@pytest.fixture(scope="module")
def built(real_target: Target, prompts: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    return {
        engine: build_distilled(data_cfg(prompts, root / engine, engine=engine), real_target)
        for engine in ("transformers", "vllm")
    }


def test_vllm_writes_the_transformers_engines_rows_and_manifest(built: dict[str, Path]) -> None:
    hf, vllm = (load_distilled(built[e]) for e in ("transformers", "vllm"))
    assert hf["id"] == vllm["id"] == [f"c{i}" for i in range(len(CONVERSATIONS))]
    for a, b in zip(hf, vllm):
        # The same prompts, to the first token either engine wrote.
        assert a["input_ids"][: a["prompt_len"]] == b["input_ids"][: b["prompt_len"]]
        assert a["n_turns"] == b["n_turns"] and sum(b["loss_mask"]) == b["n_target_tokens"] > 0
    same = sum(a["input_ids"] == b["input_ids"] and a["loss_mask"] == b["loss_mask"] for a, b in zip(hf, vllm))
    print(f"\nvLLM vs transformers regeneration (greedy, float32): {same} of {len(hf)} conversations identical")
    # Float32 greedy decoding: the engines differ only where their rounding flips a near-tie.
    assert same >= len(hf) - 1

    manifests = {e: read_manifest(built[e]) for e in built}
    assert manifests["vllm"]["generation"] == {**manifests["transformers"]["generation"], "engine": "vllm"}
    assert set(manifests["vllm"]) == set(manifests["transformers"])
    assert [(s["index"], s["name"], s["rows"]) for s in manifests["vllm"]["shards"]] == [
        (s["index"], s["name"], s["rows"]) for s in manifests["transformers"]["shards"]
    ]
    assert manifests["vllm"]["complete"] and manifests["vllm"]["rows"] == len(CONVERSATIONS)


class Interrupted(Exception):
    """Raised in place of the second shard's write: the run stops there."""


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_an_interrupted_vllm_run_resumes_to_the_same_rows(
    real_target: Target, prompts: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temperature: float
) -> None:
    whole = build_distilled(data_cfg(prompts, tmp_path / "whole", engine="vllm", temperature=temperature), real_target)
    cfg = data_cfg(prompts, tmp_path / "resumed", engine="vllm", temperature=temperature)
    write_shard = ShardStore.write_shard

    def write_one_shard(self: ShardStore, index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.done_shards():
            raise Interrupted
        return write_shard(self, index, rows)

    with monkeypatch.context() as patch:
        patch.setattr(ShardStore, "write_shard", write_one_shard)
        with pytest.raises(Interrupted):
            build_distilled(cfg, real_target)
    first = tmp_path / "resumed" / "shards" / "shard-00000"
    stamp = first.stat().st_mtime_ns
    assert not read_manifest(tmp_path / "resumed")["complete"]

    resumed = build_distilled(cfg, real_target)
    assert first.stat().st_mtime_ns == stamp  # kept, not regenerated
    # Sampled answers too: each prompt's seed comes from the shard's seeded stream, not from vLLM's scheduling.
    assert load_distilled(resumed).to_list() == load_distilled(whole).to_list()


def test_a_transformers_folder_is_not_continued_by_vllm(
    real_target: Target, prompts: str, built: dict[str, Path]
) -> None:
    with pytest.raises(DraftsmithError, match="different generation"):
        build_distilled(data_cfg(prompts, built["transformers"], engine="vllm"), real_target)
