"""Shared pieces of the training tests (tiny targets, tiny distilled data, a tiny fit); no tests here.

Also imported by the DDP test when it runs as a script in its own processes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import lightning as L
import torch
from conftest import tiny_llama

from draftsmith.drafters.base import Drafter, drafter_class
from draftsmith.drafters.target import Target, TargetIdentity
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.features import FeatureSource
from draftsmith.training.module import DrafterModule
from draftsmith.training.pipeline import checkpoint_callbacks
from draftsmith.training.settings import TrainSettings
from draftsmith.training.strategies import trainer_arguments

VOCAB = 128


def tiny_rows(n: int = 24, vocab: int = VOCAB, seed: int = 0) -> datasets.Dataset:
    """Distilled-looking rows: a short prompt (loss_mask 0) then an answer (loss_mask 1), varied lengths.

    Answers repeat a short pattern so heads can learn something in a few steps.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 8, (1,), generator=generator)),), generator=generator)
        start = int(torch.randint(3, vocab - 8, (1,), generator=generator))
        answer_len = int(torch.randint(8, 40, (1,), generator=generator))
        answer = [start + (j % 6) for j in range(answer_len)]
        rows.append(
            {
                "id": f"row{i}",
                "input_ids": prompt.tolist() + answer,
                "loss_mask": [0] * len(prompt) + [1] * answer_len,
            }
        )
    return datasets.Dataset.from_list(rows)


def tiny_target(vocab: int = VOCAB, tokenizer_hash: str = "tiny-tokenizer") -> Target:
    identity = TargetIdentity(
        name="tiny-llama", source="tests", weights_hash="seed0", tokenizer_hash=tokenizer_hash, chat_template=None
    )
    return Target(model=tiny_llama(vocab_size=vocab), tokenizer=SimpleNamespace(pad_token_id=0), identity=identity)


def tiny_drafter(target: Target, kind: str = "medusa", **fields: Any) -> Drafter:
    cls = drafter_class(kind)
    defaults: dict[str, Any] = {"num_heads": 3, "tree_topk": 4, "tree_nodes": 8}
    if kind == "amphista":
        defaults.update(attention_heads=4)
    if kind in ("eagle3", "parallelspec"):  # the feature drafters read three of the tiny target's hidden states
        defaults = {"feature_layers": [0, 1, 2], "tree_topk": 3, "tree_nodes": 8}
    drafter = cls(cls.config_class.from_dict({**defaults, **fields}))
    drafter.bind(target.model)
    return drafter


def settings(**overrides: Any) -> TrainSettings:
    base = {
        "max_epochs": 2,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 2,
        "val_fraction": 0.2,
        "max_length": 64,
        "log_every_n_steps": 1,
        "checkpoint_every_n_steps": 3,
        "sort_chunk": 2,
    }
    return TrainSettings.from_config({**base, **overrides})


def make_trainer(out: Path, train_settings: TrainSettings, callbacks: list[L.Callback] = ()) -> L.Trainer:
    return L.Trainer(
        **trainer_arguments(train_settings),
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, *checkpoint_callbacks(out / "checkpoints", train_settings.checkpoint_every_n_steps)],
    )


def tiny_fit(
    out: Path,
    train_settings: TrainSettings,
    *,
    kind: str = "medusa",
    drafter_fields: dict[str, Any] | None = None,
    callbacks: list[L.Callback] = (),
    ckpt_path: Path | None = None,
    features: FeatureSource | None = None,
    seed: int = 0,
) -> DrafterModule:
    """Seed, build a tiny target/drafter/data, fit; returns the trained module."""
    L.seed_everything(seed)
    target = tiny_target()
    drafter = tiny_drafter(target, kind, **(drafter_fields or {}))
    datamodule = DistillDataModule(
        tiny_rows(),
        batch_size=train_settings.batch_size,
        val_fraction=train_settings.val_fraction,
        max_length=train_settings.max_length,
        pad_id=0,
        seed=seed,
        sort_chunk=train_settings.sort_chunk,
        num_workers=train_settings.num_workers,
    )
    module = DrafterModule(drafter, target.model, train_settings, features)
    make_trainer(out, train_settings, callbacks).fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module
