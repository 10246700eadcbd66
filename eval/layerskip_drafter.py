"""The ``layerskip`` drafter: Draft & Verify self-speculation, training-free.

The target drafts for itself with a subset of its *whole decoder layers* skipped (attention and MLP of a
layer go together), writing its draft keys/values into the engine's KV cache past the verified length,
where the verification forward overwrites them. Drafting stops when the draft's top-1 probability falls
below a threshold gamma, which rises when recent drafts were rejected and falls when they were accepted.
Which layers to skip is searched per target by `eval.layerskip_search`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from drafters.base import DecodeState, Draft, Drafter, DrafterConfig, register
from drafters.errors import DraftsmithError
from eval.draft_feedback import ChainFeedback
from eval.sampling import warp

if TYPE_CHECKING:
    from eval.engine import SpeculativeDecoder


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
        self.decoder: SpeculativeDecoder | None = None
        self.reset()

    def bind(self, target: nn.Module) -> None:
        n = len(decoder_layers(target))
        bad = [i for i in self.config.skip_layers if not 0 <= i < n]
        if bad or len(set(self.config.skip_layers)) >= n:
            raise DraftsmithError(f"layerskip skip_layers {self.config.skip_layers} do not fit a {n}-layer target")

    def attach_decoder(self, decoder: SpeculativeDecoder) -> None:
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
        decoder, sampling = self.decoder, self.decoder.sampling
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
