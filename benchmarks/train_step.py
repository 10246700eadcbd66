"""A recipe's training step at its target's real shapes, with random weights: tokens/s and peak memory per device.

The 7B-33B recipes' targets cannot be downloaded everywhere, and a speed or memory check does not need their
weights: the target here is a Llama of the named shape with random weights (the Vicuna v1.3 shapes are those of
their config.json), the data random token rows of the recipe's ``trainer.max_length``, half prompt, half answer.
Everything else is the recipe's own: drafter, strategy (DDP, DeepSpeed ZeRO-2/3), precision, batch size,
optimizer. Times the batches after ``warmup`` optimizer steps and prints one line per device: training tokens/s,
as a ratio to the frozen target's forward alone on the same batch shape (timed just before), and peak memory.

    python benchmarks/train_step.py recipe=amphista_vicuna7b shape=vicuna-7b trainer.devices=1
    python benchmarks/train_step.py recipe=amphista_vicuna7b shape=vicuna-7b trainer=deepspeed_zero3 trainer.devices=1
    python benchmarks/train_step.py recipe=amphista_smollm2 shape=smollm2-135m steps=6   # a CPU baseline
"""

from __future__ import annotations

import sys
import time
from typing import Any

import datasets
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from draftsmith.drafters.base import drafter_class
from draftsmith.drafters.errors import DraftsmithError, one_line_errors
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.module import DrafterModule, frozen_target_expected
from draftsmith.training.pipeline import REPO_ROOT, drafter_config
from draftsmith.training.settings import TrainSettings
from draftsmith.training.strategies import trainer_arguments

# (hidden, layers, attention heads, key/value heads, MLP width, vocabulary): the targets' config.json values
SHAPES = {
    "vicuna-7b": (4096, 32, 32, 32, 11008, 32000),
    "vicuna-13b": (5120, 40, 40, 40, 13824, 32000),
    "vicuna-33b": (6656, 60, 52, 52, 17920, 32000),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "tiny": (64, 2, 4, 2, 128, 512),
}
OPTIONS = {"shape": "vicuna-7b", "steps": 10, "warmup": 3}


def random_target(shape: str, dtype: torch.dtype) -> PreTrainedModel:
    hidden, layers, heads, kv_heads, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    # built on the GPU in its final dtype: a float32 copy of a 33B target first would not fit
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def random_rows(count: int, length: int, vocab: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (count, length), generator=generator).tolist()
    mask = [[0] * (length // 2) + [1] * (length - length // 2)] * count
    return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": mask})


@torch.no_grad()
def forward_rate(target: PreTrainedModel, batch: torch.Tensor, repeats: int) -> float:
    """Tokens/s of the frozen target's forward alone on ``batch``: the floor a training step cannot go under."""
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    target(input_ids=batch)
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        target(input_ids=batch)
    sync()
    return batch.numel() * repeats / (time.perf_counter() - started)


class StepClock(L.Callback):
    """Wall time and trained tokens of every optimizer step after ``warmup``; the device's peak memory."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self._started = 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, index: int) -> None:
        self._sync(module)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, i: int) -> None:
        self._sync(module)
        if trainer.global_step > self.warmup:
            self.seconds += time.perf_counter() - self._started
            self.tokens += int(batch["attention_mask"].sum())
            self.steps += 1


def main(argv: list[str]) -> None:
    options = dict(OPTIONS)
    overrides = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in options:
            options[key] = type(options[key])(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    with initialize_config_dir(version_base=None, config_dir=str(REPO_ROOT / "recipes")):
        cfg = compose("config", overrides=overrides)
    settings = TrainSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True))
    if options["shape"] not in SHAPES:
        raise DraftsmithError(f"shape={options['shape']!r} is not known: use one of {', '.join(SHAPES)}")
    steps, warmup = int(options["steps"]), int(options["warmup"])
    if steps <= warmup:
        raise DraftsmithError(f"steps={steps} must exceed warmup={warmup}: only the steps after warmup are timed")
    arguments = trainer_arguments(settings)
    L.seed_everything(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    target = random_target(str(options["shape"]), dtype)
    config = drafter_config(cfg.drafter)
    drafter = drafter_class(config.kind)(config)
    drafter.bind(target)
    batches = steps * settings.accumulate_grad_batches * settings.devices * settings.num_nodes
    rows = random_rows(batches * settings.batch_size + 2, settings.max_length, target.config.vocab_size)
    data = DistillDataModule(
        rows, batch_size=settings.batch_size, val_fraction=0.0, max_length=settings.max_length, pad_id=0
    )
    first = torch.tensor(rows[: settings.batch_size]["input_ids"], device=target.device)
    baseline = forward_rate(target, first, steps - warmup)
    clock = StepClock(warmup)
    arguments.update(
        max_steps=steps,
        max_epochs=None,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
    )
    trainer = L.Trainer(**arguments, callbacks=[clock])
    module = DrafterModule(drafter, target, settings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with frozen_target_expected():
        trainer.fit(module, datamodule=data)
    rate = clock.tokens / max(clock.seconds, 1e-9)
    trainable = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
    zero = f" ZeRO-{settings.zero_stage}" if settings.strategy == "deepspeed" else ""
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else "n/a (CPU)"
    print(
        f"rank {trainer.global_rank}: {cfg.recipe_name} ({config.kind}, {trainable / 1e6:.1f} M trainable) on a random "
        f"{options['shape']} target | strategy {settings.strategy}{zero}, precision {settings.precision}, batch "
        f"{settings.batch_size} x {settings.max_length} tokens | training {rate:,.0f} tokens/s over {clock.steps} "
        f"timed batches = {rate / baseline:.2f}x the target's forward alone ({baseline:,.0f} tokens/s) | "
        f"peak memory {peak}"
    )


if __name__ == "__main__":
    with one_line_errors():
        main(sys.argv[1:])
