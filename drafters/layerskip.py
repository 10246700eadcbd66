"""The ``layerskip`` drafter: Draft & Verify self-speculation, training-free.

The target drafts for itself with a subset of its *whole decoder layers* skipped (attention and MLP of a
layer go together), writing its draft keys/values into the engine's KV cache past the verified length,
where the verification forward overwrites them. Drafting stops when the draft's top-1 probability falls
below a threshold gamma, which rises when recent drafts were rejected and falls when they were accepted.
Which layers to skip is searched per target (`search_skip_layers`): start by skipping every other middle
layer, then local search: flip one or two layers (never the first or the last) and keep the change when
greedy speculative decoding of a few prompts through the evaluator's engine gets faster (tokens/s). The
result is saved as JSON per target (keyed by its weights hash) and reused by later runs.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from draftsmith.drafters.base import Decoder, DecodeState, Draft, Drafter, DrafterConfig, register
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.feedback import ChainFeedback
from draftsmith.drafters.sampling import warp
from draftsmith.drafters.target import Target, TargetIdentity, cache_root


@dataclass
class LayerSkipConfig(DrafterConfig):
    kind: ClassVar[str] = "layerskip"
    skip_layers: list[int] = field(default_factory=list)
    max_draft: int = 8
    gamma: float = 0.5  # initial stop threshold on the draft's top-1 probability
    target_acceptance: float = 0.7  # gamma moves to keep the draft acceptance rate near this
    gamma_step: float = 0.05


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a Llama/Qwen-family causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise DraftsmithError(
            f"layerskip needs a Llama/Qwen-family target with model.layers; {type(model).__name__} has none"
        )
    return layers


@contextmanager
def skipping_layers(model: nn.Module, skip: list[int]) -> Iterator[None]:
    """Run the model without the given decoder layers; each kept layer still writes its own cache slot."""
    layers = decoder_layers(model)
    skipped = set(skip)
    model.model.layers = nn.ModuleList([layer for i, layer in enumerate(layers) if i not in skipped])
    try:
        yield
    finally:
        model.model.layers = layers


@register
class LayerSkipDrafter(Drafter):
    config_class = LayerSkipConfig

    def __init__(self, config: LayerSkipConfig | None = None) -> None:
        super().__init__(config or LayerSkipConfig())
        self.decoder: Decoder | None = None
        self.identity: TargetIdentity | None = None
        self.needs_tuning = False
        self.reset()

    @classmethod
    def for_target(cls, target: Target) -> LayerSkipDrafter:
        """The skip set saved for this target, or none yet (``needs_tuning``: the evaluator calls `tune`)."""
        path = skip_file(target.identity)
        drafter = cls(LayerSkipConfig(skip_layers=_saved_skip(path)) if path.is_file() else None)
        drafter.identity, drafter.needs_tuning = target.identity, not path.is_file()
        drafter.bind(target.model)
        return drafter

    def tune(self, decoder: Decoder, prompts: list[list[int]], progress: bool = True, budget: int = 8) -> None:
        """Search the skip set on ``prompts`` and save it for this target (see the module docstring)."""
        with torch.no_grad():
            skip, tokens_per_s = search_skip_layers(decoder, prompts, budget=budget, progress=progress)
        self.config.skip_layers, self.needs_tuning = skip, False
        if self.identity is not None:
            path = skip_file(self.identity)
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"skip_layers": skip, "tokens_per_s": tokens_per_s, "budget": budget, "target": self.identity.name}
            path.write_text(json.dumps(record, indent=2) + "\n")

    def bind(self, target: nn.Module) -> None:
        n = len(decoder_layers(target))
        bad = [i for i in self.config.skip_layers if not 0 <= i < n]
        if bad or len(set(self.config.skip_layers)) >= n:
            raise DraftsmithError(f"layerskip skip_layers {self.config.skip_layers} do not fit a {n}-layer target")

    def attach_decoder(self, decoder: Decoder) -> None:
        self.bind(decoder.model)
        self.decoder = decoder

    def reset(self) -> None:
        self.gamma = self.config.gamma
        self.feedback = ChainFeedback()

    def _adapt(self, tokens: torch.Tensor) -> None:
        """Move gamma by how much of the previous draft the target kept."""
        accepted = self.feedback.accepted(tokens)
        if accepted is None:
            return
        rate = accepted / len(self.feedback.draft)
        step = self.config.gamma_step if rate < self.config.target_acceptance else -self.config.gamma_step
        self.gamma = min(max(self.gamma + step, 0.05), 0.95)

    def propose(self, state: DecodeState) -> Draft:
        if self.decoder is None:
            raise DraftsmithError("layerskip drafts through the evaluator's engine; run it via SpeculativeDecoder")
        self._adapt(state.tokens)
        decoder, sampling = self.decoder, state.sampling
        start = state.tokens.numel() - 1
        token = state.tokens[-1:]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        one = torch.ones(1, 1, dtype=torch.bool)
        with skipping_layers(decoder.model, self.config.skip_layers):
            for i in range(min(self.config.max_draft, decoder.max_draft_nodes)):
                logits, _ = decoder.forward(token, start + i, torch.zeros(1, dtype=torch.long), one)
                q = torch.softmax(logits[0], dim=-1) if state.greedy else warp(logits[0], sampling)
                choice = int(q.argmax()) if state.greedy else int(torch.multinomial(q, 1, generator=state.generator))
                if i > 0 and float(q.max()) < self.gamma:
                    break
                tokens.append(choice)
                probs.append(q)
                token = torch.tensor([choice])
        self.feedback.remember(tokens, state.tokens)
        # greedy drafts are deterministic candidates; sampled ones carry the q they were drawn from
        return Draft.chain(tokens, probs=None if state.greedy else torch.stack(probs))


def skip_file(identity: TargetIdentity) -> Path:
    return cache_root() / "layerskip" / f"{identity.name}-{identity.weights_hash[:16]}.json"


def _saved_skip(path: Path) -> list[int]:
    try:
        skip = json.loads(path.read_text())["skip_layers"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DraftsmithError(f"{path} is not a saved layerskip search: delete it to search again") from None
    if not isinstance(skip, list) or not all(isinstance(i, int) for i in skip):
        raise DraftsmithError(f"{path}: skip_layers must be a list of layer indices; delete it to search again")
    return skip


def measure(decoder: Decoder, drafter: LayerSkipDrafter, prompts: list[list[int]], max_new: int) -> float:
    """Tokens per second of greedy speculative decoding over the prompts."""
    tokens, began = 0, time.perf_counter()
    for prompt in prompts:
        tokens += len(decoder.generate(prompt, drafter, max_new).tokens)
    return tokens / (time.perf_counter() - began)


def search_skip_layers(
    decoder: Decoder,
    prompts: list[list[int]],
    *,
    budget: int = 8,
    max_new_tokens: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[int], float]:
    """Return the fastest skip set found in ``budget`` measured trials and its tokens/s."""
    n = len(decoder_layers(decoder.model))
    middle = list(range(1, n - 1)) if n >= 3 else [n - 1]  # too few layers to keep both ends: the last
    rng = random.Random(seed)

    def speed(skip: list[int]) -> float:
        return measure(decoder, LayerSkipDrafter(LayerSkipConfig(skip_layers=skip)), prompts, max_new_tokens)

    best = sorted(middle[::2])
    best_speed = speed(best)
    for _ in tqdm(range(budget - 1), desc="layerskip search", unit="trial", disable=not progress):
        candidate = set(best)
        for layer in rng.sample(middle, k=min(len(middle), rng.choice((1, 2)))):
            candidate ^= {layer}
        if not candidate:
            continue
        trial = sorted(candidate)
        trial_speed = speed(trial)
        if trial_speed > best_speed:
            best, best_speed = trial, trial_speed
    return best, best_speed
