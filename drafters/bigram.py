"""The ``bigram`` drafter: a test instrument, not a drafter to ship. It guesses each token from the one before.

``logits(next | prev) = lm_head(W emb(prev))``: the target's input embeddings and LM head (and its bias, if
any) are borrowed, frozen and not saved; ``W`` (hidden x hidden) is the only trained weight. It exists to show
that a drafter kind lives in one file, one YAML and its test, and trains, exports, loads and decodes through the
ordinary commands.

Choices (config field, default):
- It reads nothing of the target (``target_needs()`` is empty), so training never runs the target forward
  (`training.features.OnlineFeatures` returns no features) and decoding asks for no hidden states.
- ``W`` starts as the identity: a fresh drafter proposes the token whose output embedding best matches the
  previous token's input embedding (for a tied-embedding target such as SmolLM2, mostly a repeat).
- ``loss``: cross-entropy predicting token t+1 from token t, where t+1 is target-written (``loss_mask``) and both
  lie inside ``attention_mask``. `LossOutput` has one draft position (K = 1), with hits at ranks 0..TOPK-1.
- ``draft_len`` = 4: `propose` hangs a chain of that many tokens below the root, each the argmax of the bigram
  from the previous one; when sampling, each is drawn from ``warp(logits, state.sampling)`` with
  ``state.generator`` and the chain carries those distributions (`Draft.probs`), so speculative sampling stays
  lossless. `set_draft_size` sets ``draft_len``.
- ``hidden_size`` = None: the target's, taken when first bound; saved, so a target of another width is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig, LossOutput, register
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.multihead import Borrowed, borrow_lm_head, rank_hits
from draftsmith.drafters.sampling import warp

TOPK = 5  # ranks the loss counts hits at


@dataclass
class BigramConfig(DrafterConfig):
    kind: ClassVar[str] = "bigram"
    draft_len: int = 4
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        if self.draft_len < 1:
            raise DraftsmithError(f"bigram draft_len={self.draft_len}: give a chain length >= 1")


@register
class BigramDrafter(Drafter):
    config_class = BigramConfig
    config: BigramConfig

    def __init__(self, config: BigramConfig | None = None) -> None:
        super().__init__(config or BigramConfig())
        self.borrowed = Borrowed()
        self.mix: nn.Linear | None = None
        if self.config.hidden_size is not None:
            self._build(self.config.hidden_size)

    def _build(self, hidden: int) -> None:
        self.mix = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(hidden))

    def bind(self, target: nn.Module) -> None:
        weight = borrow_lm_head(self.borrowed, target)
        embed = target.get_input_embeddings()
        self.borrowed.set("embed", embed)
        hidden = embed.weight.shape[1]
        if self.config.hidden_size not in (None, hidden):
            wanted = self.config.hidden_size
            raise DraftsmithError(f"this drafter has hidden_size={wanted}, the target {hidden}: use its own target")
        if self.mix is None:
            self.config.hidden_size = hidden
            self._build(hidden)
            self.to(weight.device)

    def logits(self, prev: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., V]`` after each token of ``prev [...]``."""
        if self.mix is None:
            raise DraftsmithError("the bigram drafter is not built yet: call drafter.bind(target_model) first")
        w = self.mix.weight
        embed, lm_head = (self.borrowed.get(name, w.device, w.dtype) for name in ("embed", "lm_head"))
        bias = self.borrowed.get("lm_head_bias", w.device, w.dtype) if "lm_head_bias" in self.borrowed else None
        return F.linear(self.mix(F.embedding(prev.to(w.device), embed)), lm_head, bias)

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> LossOutput:
        ids, inside = batch["input_ids"], batch["attention_mask"].bool()
        counted = inside[:, :-1] & inside[:, 1:] & batch["loss_mask"][:, 1:].bool()
        rows, positions = counted.nonzero(as_tuple=True)
        labels = ids[rows, positions + 1]
        logits = self.logits(ids[rows, positions]).float()
        # a batch without counted positions still backpropagates (a zero loss with a graph)
        loss = F.cross_entropy(logits, labels) if labels.numel() else logits.sum() * 0.0
        hits = rank_hits(logits, labels, TOPK)
        counts = torch.tensor([float(labels.numel())], device=hits.device)
        return LossOutput(loss=loss, hits=hits[None], counts=counts)

    @torch.no_grad()
    def propose(self, state: DecodeState) -> Draft:
        token = state.tokens[-1:]
        tokens, probs = [], []
        for _ in range(self.config.draft_len):
            logits = self.logits(token)[0]
            if state.greedy:
                token = logits.argmax().view(1)
            else:
                probs.append(warp(logits, state.sampling))
                token = torch.multinomial(probs[-1], 1, generator=state.generator)
            tokens.append(token)
        # the engine keeps its tokens on the CPU; the distributions stay beside the target's
        return Draft.chain(torch.cat(tokens).cpu(), probs=torch.stack(probs) if probs else None)

    def max_draft_nodes(self) -> int:
        return self.config.draft_len

    def set_draft_size(self, nodes: int) -> None:
        self.config = dataclasses.replace(self.config, draft_len=nodes)  # checked like any config

    def draft_shape(self) -> dict[str, Any]:
        return {"draft_len": self.config.draft_len}
