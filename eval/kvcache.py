"""A preallocated target KV cache (transformers' `StaticCache`) that is rolled back by length.

transformers' `StaticLayer` writes new keys at its own ``cumulative_length`` counter, a private detail that
holds in the versions pyproject.toml allows (SUPPORTED_TRANSFORMERS), so "rolling back" is setting that
counter before each forward; the slots past the verified length keep stale entries that the attention mask
hides and the next forward overwrites.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from draftsmith.drafters.errors import DraftsmithError

SUPPORTED_TRANSFORMERS = ">=5.17,<5.25"  # keep equal to pyproject.toml's pin


def check_cache_internals(layer: StaticLayer) -> None:
    """The rollback writes transformers' private per-layer counter: refuse a version where it moved."""
    if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
        import transformers

        raise DraftsmithError(
            f"transformers {transformers.__version__} changed StaticLayer.cumulative_length, which the rollback cache "
            f"writes; install a supported version: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


class RollbackCache:
    def __init__(self, model: PreTrainedModel, capacity: int) -> None:
        self.capacity = capacity
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        for layer in self.cache.layers:
            if type(layer) is not StaticLayer:
                raise DraftsmithError(
                    f"target layer cache {type(layer).__name__} is not supported (sliding-window or hybrid "
                    "attention); use a Llama/Qwen-family target with full attention"
                )
            check_cache_internals(layer)

    def write_at(self, slot: int) -> None:
        """The next forward writes its keys/values at slots ``slot, slot + 1, ...``."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(slot)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V entries at slots ``src`` to slots ``dst`` (accepted tree path -> contiguous)."""
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, src))
