"""Test helpers other packages reuse: the greedy-lossless check and a drafter that builds random trees."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.eval.engine import SpeculativeDecoder


def assert_lossless_greedy(
    target_model: PreTrainedModel,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: set[int] | None = None,
) -> None:
    """Greedy speculative decoding with ``drafter`` must reproduce plain greedy decoding token for token."""
    decoder = SpeculativeDecoder(target_model, eos_ids=eos_ids if eos_ids is not None else set())
    for prompt in prompts:
        plain = decoder.generate(list(prompt), PlainDrafter(), max_new_tokens).tokens
        spec = decoder.generate(list(prompt), drafter, max_new_tokens).tokens
        if spec != plain:
            first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
            raise AssertionError(
                f"{type(drafter).__name__} is not lossless on prompt {list(prompt)}: first difference at new "
                f"token {first}\nplain:       {plain}\nspeculative: {spec}"
            )


@dataclass
class RandomTreeConfig(DrafterConfig):
    kind: ClassVar[str] = "random-tree"
    max_nodes: int = 12
    hit_rate: float = 0.7
    branching: float = 0.5
    seed: int = 0


class RandomTreeDrafter(Drafter):
    """Random trees whose nodes carry the right token (from ``reference``, the known greedy output) with
    probability ``hit_rate`` and a random one otherwise, so both long acceptances and rejections happen.
    ``branching`` is the chance that a node hangs below a random earlier node instead of the last one;
    0 gives chains. Not registered: a test instrument, not a drafter kind."""

    config_class = RandomTreeConfig

    def __init__(self, config: RandomTreeConfig, reference: Sequence[int], vocab_size: int) -> None:
        super().__init__(config)
        self.reference = list(reference)
        self.vocab_size = vocab_size
        self.rng = random.Random(config.seed)

    def propose(self, state: DecodeState) -> Draft:
        cfg, rng = self.config, self.rng
        done = state.tokens.numel() - state.prompt_len  # reference index of the root
        size = rng.randint(0, cfg.max_nodes)
        parents: list[int] = []
        depths: list[int] = []
        tokens: list[int] = []
        for node in range(size):
            if node == 0 or rng.random() < cfg.branching:
                parent = rng.randint(-1, node - 1)
            else:
                parent = node - 1
            depth = 1 if parent < 0 else depths[parent] + 1
            truth = done + depth - 1
            right = truth < len(self.reference) and rng.random() < cfg.hit_rate
            tokens.append(self.reference[truth] if right else rng.randrange(self.vocab_size))
            parents.append(parent)
            depths.append(depth)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))
