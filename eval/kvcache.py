"""A preallocated target KV cache (transformers' `StaticCache`) that is rolled back by length.

transformers' `StaticLayer` writes new keys at its own ``cumulative_length`` counter (5.17 and 5.23 alike),
so "rolling back" is setting that counter before each forward; the slots past the verified length keep
stale entries that the attention mask hides and the next forward overwrites.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from drafters.errors import DraftsmithError


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
