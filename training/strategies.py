"""Trainer settings -> a Lightning strategy and Trainer arguments (single device, DDP, DeepSpeed ZeRO).

ZeRO-3 and the frozen target: the target is a submodule of DrafterModule, so DeepSpeed partitions its
weights across GPUs like the drafter's (each GPU holds 1/N of them and gathers a layer's weights just in
time for the forward). It has no gradients and is not in the optimizer, so ZeRO keeps no optimizer state or
gradient partitions for it; checkpoints leave it out (``exclude_frozen_parameters``). ZeRO-2 keeps a full
target copy per GPU and partitions only the drafter's optimizer state and gradients.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, Strategy

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.settings import TrainSettings

# Rank 0 runs the acceptance eval alone after each epoch while the other ranks wait in their next
# collective: the default 30-minute process-group timeout is too short for a 7B model's eval.
COLLECTIVE_TIMEOUT = timedelta(hours=4)


def build_strategy(settings: TrainSettings) -> str | Strategy:
    if settings.strategy == "auto":
        return "auto"
    if settings.strategy == "ddp":
        backend = "gloo" if settings.accelerator == "cpu" else "nccl"
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False, timeout=COLLECTIVE_TIMEOUT)
    try:
        import deepspeed  # noqa: F401 - only checking it is installed
    except ImportError:
        raise DraftsmithError(
            "trainer.strategy=deepspeed needs DeepSpeed: `pip install -e '.[deepspeed]'` on a CUDA machine"
        ) from None
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=settings.zero_stage, exclude_frozen_parameters=True, timeout=COLLECTIVE_TIMEOUT)


def trainer_arguments(settings: TrainSettings) -> dict[str, Any]:
    """The `L.Trainer` keyword arguments the trainer config decides."""
    return {
        "accelerator": settings.accelerator,
        "strategy": build_strategy(settings),
        "devices": settings.devices,
        "num_nodes": settings.num_nodes,
        "precision": settings.precision,
        "max_epochs": settings.max_epochs,
        "max_steps": settings.max_steps,
        "accumulate_grad_batches": settings.accumulate_grad_batches,
        "gradient_clip_val": settings.grad_clip,
        "log_every_n_steps": settings.log_every_n_steps,
        # the batch sampler shards by rank itself (Lightning would rebuild the loader and lose its resume state)
        "use_distributed_sampler": False,
    }
