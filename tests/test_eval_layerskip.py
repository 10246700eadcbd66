"""The layerskip skip-set search runs through the engine, saves its choice per target and reuses it."""

from __future__ import annotations

import json

from draftsmith.drafters.layerskip import LayerSkipDrafter, skip_file
from draftsmith.eval.loading import load_drafter


def test_search_is_saved_and_reused(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    drafter = load_drafter("layerskip", tiny_target)
    saved = json.loads(skip_file(tiny_target.identity).read_text())
    assert saved["skip_layers"] == drafter.config.skip_layers and saved["tokens_per_s"] > 0
    assert 0 < len(drafter.config.skip_layers) < tiny_target.model.config.num_hidden_layers
    skip_file(tiny_target.identity).write_text(json.dumps({**saved, "skip_layers": [0]}))
    reused = load_drafter("layerskip", tiny_target)
    assert isinstance(reused, LayerSkipDrafter) and reused.config.skip_layers == [0] and not reused.needs_tuning
