"""EAGLE-3 and ParallelSpec through `python train.py`: online features and the feature cache, export (with the
serving-engine forms), and loading the export back for lossless decoding."""

from __future__ import annotations

import json

import pytest
from test_training_e2e import PROMPTS, TINY, _train

from draftsmith.eval.loading import load_drafter
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.mark.parametrize(
    ("kind", "features"),
    [("eagle3", "cache"), ("parallelspec", "online")],
)
def test_feature_drafter_trains_exports_and_decodes(tmp_path, prompts, real_target, kind, features) -> None:
    cache = ["data.features.enabled=true", "data.features.layers=[2,15,27]"] if features == "cache" else []
    done = _train(
        f"recipe={kind}_smollm2",
        f"out={tmp_path / 'run'}",
        f"data.out={tmp_path / 'data'}",
        f"data.prompts={prompts}",
        f"trainer.features={features}",
        "drafter.tree_nodes=6",
        *cache,
        *TINY,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    export = tmp_path / "run" / "export"
    assert json.loads((export / "config.json").read_text())["drafter"]["kind"] == kind
    drafter = load_drafter(str(export), real_target)
    ids = real_target.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert_lossless_greedy(real_target.model, drafter, [ids], 8)
    card = (export / "README.md").read_text()
    if kind == "eagle3":
        assert "## Serving engines" in card and "engines/speculators" in card
        for form in ("speculators", "sglang"):
            assert (export / "engines" / form / "model.safetensors").is_file(), form
        from_engine_form = load_drafter(str(export / "engines" / "speculators"), real_target)
        assert from_engine_form.config.kind == "eagle3"
        assert_lossless_greedy(real_target.model, from_engine_form, [ids], 8)
    else:
        assert not (export / "engines").exists() and "No serving engine loads this parallelspec drafter" in card
