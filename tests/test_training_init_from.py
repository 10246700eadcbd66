"""`drafter.init_from`: the one hook that starts a fresh drafter from pretrained weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import perturb, tiny_llama

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.training.pipeline import build_drafter


def test_a_fresh_drafter_starts_from_an_exports_weights(tmp_path) -> None:
    model = tiny_llama()
    trained = MedusaDrafter(MedusaConfig(num_heads=2, tree_nodes=4))
    trained.bind(model)
    perturb(trained, 1.0)
    trained.save_pretrained(tmp_path / "export")
    target = SimpleNamespace(model=model)
    fresh = build_drafter({"kind": "medusa", "num_heads": 2, "tree_nodes": 4}, target)
    started = build_drafter(
        {"kind": "medusa", "num_heads": 2, "tree_nodes": 4, "init_from": str(tmp_path / "export")}, target
    )
    for name, value in trained.state_dict().items():
        assert torch.equal(started.state_dict()[name], value), name
        assert not torch.equal(fresh.state_dict()[name], value), name


def test_init_from_faults_are_one_line(tmp_path) -> None:
    target = SimpleNamespace(model=tiny_llama())
    with pytest.raises(DraftsmithError, match="cannot start from the target's own layers"):
        build_drafter({"kind": "medusa", "init_from": "target"}, target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftsmithError, match="model.safetensors does not exist"):
        build_drafter({"kind": "medusa", "init_from": str(tmp_path / "empty")}, target)
    other = MedusaDrafter(MedusaConfig(num_heads=3, tree_nodes=4))
    other.bind(target.model)
    other.save_pretrained(tmp_path / "three_heads")
    with pytest.raises(DraftsmithError, match="its weights do not fit this drafter .*start from an export of the same"):
        build_drafter({"kind": "medusa", "num_heads": 2, "init_from": str(tmp_path / "three_heads")}, target)
