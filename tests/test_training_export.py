"""Export folder: round trip through Drafter.from_pretrained, model card, tokenizer-mismatch refusal."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from test_training_support import tiny_drafter, tiny_target

from draftsmith.drafters.base import Drafter
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.export import write_export
from draftsmith.training.report import acceptance_rows

SUMMARY = {
    "drafter": "medusa",
    "target": "tiny-llama",
    "n_questions": 3,
    "tau": 1.85,
    "tau_per_question": [1.8, 1.9, 1.85],
    "alpha": [0.6, 0.35, 0.2],
    "speedup": 1.21,
    "tokens_per_s": {"plain": 10.0, "speculative": 12.1},
    "lossless_mismatches": 0,
    "by_category": {"math": {"tau": 2.0, "alpha": [0.7, 0.4], "speedup": 1.3, "lossless_mismatches": 0}},
}
CONFIG = {"recipe_name": "tiny", "target": {"name": "tiny-llama", "source": "org/tiny-llama"}, "trainer": {"lr": 0.1}}


def _trained_drafter(target):
    drafter = tiny_drafter(target, "medusa", share_lm_head=False)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p))  # weights that differ from a fresh drafter's
    drafter.set_tree([[0], [1], [0, 0]])
    return drafter


def test_round_trip_gives_identical_weights_and_config(tmp_path):
    target = tiny_target()
    drafter = _trained_drafter(target)
    out = write_export(tmp_path / "export", drafter, target.identity, CONFIG, SUMMARY)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "eval",
        "model.safetensors",
        "recipe.yaml",
    ]
    loaded = Drafter.from_pretrained(out, target=target.model, tokenizer_hash=target.identity.tokenizer_hash)
    assert loaded.config.to_dict() == drafter.config.to_dict()
    expected, got = drafter.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "draftsmith" and config["format_version"] >= 1
    assert config["tokenizer_hash"] == target.identity.tokenizer_hash
    assert config["target"]["name"] == "tiny-llama" and config["drafter"]["kind"] == "medusa"
    assert not any(name.startswith("model.") for name in got)  # nothing of the target
    assert json.loads((out / "eval" / "summary.json").read_text()) == SUMMARY
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == CONFIG


def test_model_card_has_front_matter_metrics_and_usage(tmp_path):
    target = tiny_target()
    out = write_export(tmp_path / "export", _trained_drafter(target), target.identity, CONFIG, SUMMARY)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "draftsmith"
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.pipeline_tag == "text-generation"
    assert "speculative-decoding" in card.data.tags and "drafter-medusa" in card.data.tags
    assert "| all | 1.85 | 0.60 | 0.35 | 0.20 | 1.21x | 0 |" in card.text
    assert "| math | 2.00 | 0.70 | 0.40 | - | 1.30x | 0 |" in card.text
    assert "python -m eval drafter=" in card.text


def test_acceptance_rows_pad_short_categories():
    header, rows = acceptance_rows(SUMMARY)
    assert header == ["category", "tau", "alpha_1", "alpha_2", "alpha_3", "speedup", "lossless mismatches"]
    assert [row[0] for row in rows] == ["math", "all"]


def test_a_new_export_replaces_the_old_whole(tmp_path):
    target = tiny_target()
    write_export(tmp_path / "export", _trained_drafter(target), target.identity, CONFIG, SUMMARY)
    write_export(tmp_path / "export", _trained_drafter(target), target.identity, CONFIG, None)
    assert not (tmp_path / "export" / "eval").exists()  # no stale summary of the previous drafter
    assert "No evaluation" in (tmp_path / "export" / "README.md").read_text()
    assert not (tmp_path / "export.partial").exists()


def test_loading_for_a_target_with_another_tokenizer_is_refused(tmp_path):
    target = tiny_target()
    out = write_export(tmp_path / "export", _trained_drafter(target), target.identity, CONFIG, SUMMARY)
    other = tiny_target(tokenizer_hash="another-tokenizer")
    with pytest.raises(DraftsmithError, match="tokenizer"):
        Drafter.from_pretrained(out, target=other.model, tokenizer_hash=other.identity.tokenizer_hash)
