"""Where a training step gets the target's features: a target forward inside the step, or the feature cache."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from draftsmith.drafters.base import TargetNeeds


class FeatureSource(Protocol):
    def __call__(self, target: nn.Module, batch: dict[str, torch.Tensor], needs: TargetNeeds) -> dict[str, Any]: ...


class OnlineFeatures:
    """Runs the target inside the step. A frozen target keeps no autograd graph; one with trainable weights
    (Medusa-2's LoRA adapters) keeps it, so the drafter's loss trains them too."""

    def __init__(self, topk: int = 0) -> None:
        self.topk = topk

    def __call__(self, target: nn.Module, batch: dict[str, torch.Tensor], needs: TargetNeeds) -> dict[str, Any]:
        from draftsmith.data.features import target_features

        grad = any(param.requires_grad for param in target.parameters())
        if not needs.any and not grad:  # the drafter reads nothing of the target: no forward to pay for
            return {}
        return target_features(target, batch["input_ids"], batch["attention_mask"], needs, topk=self.topk, grad=grad)


class CachedFeatures:
    """Reads the features of the batch's rows from a `data.features.FeatureCache`."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def __call__(self, target: nn.Module, batch: dict[str, torch.Tensor], needs: TargetNeeds) -> dict[str, Any]:
        features = self.cache.batch(batch["row"].tolist(), pad_to=batch["input_ids"].shape[1])
        return move_data_to_device(features, batch["input_ids"].device)
