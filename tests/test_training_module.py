"""DrafterModule: frozen target kept out of optimizer and checkpoints, online == cached features, validation."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from test_training_support import settings, tiny_drafter, tiny_fit, tiny_rows, tiny_target

from draftsmith.data.features import FeatureCache, cache_folder, write_feature_cache
from draftsmith.data.store import FORMAT, ShardStore, shard_entry
from draftsmith.drafters.base import TargetNeeds
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.eval.metrics import chain_tau
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.features import CachedFeatures, OnlineFeatures
from draftsmith.training.module import DrafterModule, frozen_target_expected


def test_chain_tau_formula():
    assert chain_tau([0.0, 0.9]) == pytest.approx(1.0)
    assert chain_tau([0.5, 0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert chain_tau([1.0] * 4) == pytest.approx(5.0)


def _distilled_folder(tmp_path, rows):
    """A minimal finished distillation folder around ``rows``, as data.build_distilled writes it."""
    store = ShardStore(tmp_path / "data")
    full = [
        {
            **r,
            "category": "t",
            "n_turns": 1,
            "prompt_len": r["loss_mask"].index(1),
            "n_target_tokens": sum(r["loss_mask"]),
            "n_truncated": 0,
        }
        for r in rows
    ]
    with store.writing():
        shards = [store.write_shard(0, full[:10]), store.write_shard(1, full[10:])]
        store.write_manifest(
            {
                "format": FORMAT,
                "format_version": 1,
                "prompts_hash": "p",
                "generation": {},
                "shards": shards,
                "complete": True,
            }
        )
    assert shard_entry(0, full[:10])["rows"] == 10
    return store.root


def test_cached_features_give_the_online_loss(tmp_path):
    target = tiny_target()
    drafter = tiny_drafter(target, "amphista")
    rows = tiny_rows(16)
    needs = drafter.target_needs()
    folder = _distilled_folder(tmp_path, list(rows))
    write_feature_cache(folder, target, needs)
    cached = CachedFeatures(FeatureCache(cache_folder(folder, needs, 0)))
    datamodule = DistillDataModule(rows, batch_size=5, val_fraction=0.0, max_length=30, pad_id=0)
    for batch in datamodule.train_dataloader():
        online = drafter.loss(batch, OnlineFeatures()(target.model, batch, needs))
        offline = drafter.loss(batch, cached(target.model, batch, needs))
        torch.testing.assert_close(online.loss, offline.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(online.hits, offline.hits)


def test_target_is_frozen_out_of_the_optimizer_and_the_checkpoint(tmp_path):
    module = tiny_fit(tmp_path, settings(max_epochs=1))
    optimised = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.drafter.parameters() if p.requires_grad}
    assert all(not p.requires_grad and p.grad is None for p in module.target.parameters())
    assert not module.target.training
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(k.startswith("drafter.") for k in checkpoint["state_dict"])


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_train_mode_reaches_the_drafter_and_never_the_target(kind):
    # frozen_target_expected silences Lightning's "modules in eval mode" warning: only the target may be in eval mode
    target = tiny_target()
    module = DrafterModule(tiny_drafter(target, kind), target.model, settings()).train()
    in_eval = {name for name, m in module.named_modules() if not m.training}
    assert in_eval == {name for name, _ in module.named_modules() if name.startswith("target")}


def test_frozen_target_expected_silences_only_the_eval_mode_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with frozen_target_expected():
            warnings.warn(
                "Found 397 module(s) in eval mode at the start of training.", PossibleUserWarning, stacklevel=1
            )
            warnings.warn("The dataloader does not have many workers.", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers."]


def test_validation_measures_accuracy_and_sets_the_tree(tmp_path):
    module = tiny_fit(tmp_path, settings(max_epochs=4, lr=3e-2), drafter_fields={"share_lm_head": False})
    measured = module.val_rank_accuracy
    assert measured.shape == (3, 4) and float(measured.sum(-1).max()) <= 1.0
    assert float(measured[0, 0]) > 0.15  # the repeating answers are learnable (a fresh drafter scores ~0)
    assert module.drafter.config.tree is not None and len(module.drafter.config.tree) == 8
    assert torch.allclose(torch.tensor(module.drafter.config.rank_acc), measured)
    metrics = module.trainer.callback_metrics
    assert metrics["val/tau_est"] == pytest.approx(chain_tau(measured[:, 0].tolist()), rel=1e-5)
    assert "train/tokens_per_s" in metrics and "train/acc_top4/pos1" in metrics


def test_a_drafter_without_trainable_weights_is_refused():
    target = tiny_target()
    drafter = tiny_drafter(target).requires_grad_(False)
    with pytest.raises(DraftsmithError, match="no trainable parameters"):
        DrafterModule(drafter, target.model, settings())


def test_cache_mode_without_a_cache_is_a_clear_error(tmp_path):
    from omegaconf import OmegaConf

    from draftsmith.training.pipeline import feature_source

    target = tiny_target()
    drafter = tiny_drafter(target)
    data_cfg = OmegaConf.create({"features": {"enabled": False, "layers": [-1], "topk": 0}})
    with pytest.raises(DraftsmithError, match="data.features.enabled=true"):
        feature_source(settings(features="cache"), tmp_path, data_cfg, drafter)
    data_cfg = OmegaConf.create({"features": {"enabled": True, "layers": [3], "topk": 0}})
    with pytest.raises(DraftsmithError, match="data.features.layers"):
        feature_source(settings(features="cache"), tmp_path, data_cfg, drafter)
    assert json.dumps(TargetNeeds().hidden_layers) == "[]"
