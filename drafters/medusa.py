"""Medusa (Cai et al. 2024): K extra decoding heads on the target's last hidden state; Medusa-1 or Medusa-2.

Head k (1-based) reads h_t, the target's last hidden state (after its final norm) at position t, and
guesses token t+k+1; the target's own head gives t+1. A head is ``num_layers`` residual blocks
``x + SiLU(W x + b)`` (zero-initialised: a fresh head is the identity) followed by a vocabulary projection.
Decoding takes each head's top-``tree_topk`` tokens at the root's position and hangs them in a sparse tree
(`drafters.rank_trees`), verified by the target in one forward.

Choices the paper leaves open (config field, default):
- ``num_heads`` = 4 (the paper uses 4 to 5); ``num_layers`` = 1 residual block per head.
- ``share_lm_head`` = True: every head uses the target's LM head, borrowed and frozen (not saved); False
  gives each head a trainable copy initialised from it (K x vocab x hidden more parameters).
- ``loss_type`` = "ce": head k's loss is the cross-entropy on the target-written token t+k+1; "kl" = KL(target ||
  head k) to the target's distribution for that token (its logits at t+k; the features must carry them).
- ``loss_decay`` = 0.8: loss = sum_k 0.8**(k-1) L_k, each L_k the mean over head k's counted positions.
- ``tree`` = None: the Medusa-paper greedy tree of ``tree_nodes`` nodes built from a prior (the paper's
  Vicuna-7B head accuracies, `drafters.trees.prior_rank_acc`); `set_tree` stores a measured tree instead.
- ``tree_nodes`` = 63 (the shipped Medusa trees); ``tree_topk`` = 10 candidates per head, also the ranks
  ``loss`` counts hits at (``topk_hits``) so a tree can be built from validation counts.
- ``hidden_size`` / ``vocab_size`` = None: taken from the target when the drafter is first bound.

Medusa-1 keeps the target frozen. Medusa-2 (``lora_rank`` > 0) trains LoRA adapters on the target jointly with
the heads, plus a self-distillation KL that keeps the adapted target close to the original; the adapted
target is then the model served. This file only holds the settings: `training.lora` attaches and trains the
adapter, the export carries it, and `eval.loading` merges it into the target before decoding. Fields, default:
- ``lora_rank`` = 0: 0 = Medusa-1; the paper leaves the rank open (8 is a common LoRA choice).
- ``lora_alpha`` = 16.0 (LoRA scale alpha / rank); ``lora_dropout`` = 0.05 on the adapters' inputs in training.
- ``lora_target_modules`` = the attention and MLP projections of Llama / Qwen / Mistral blocks; never the LM
  head or the embeddings, which the heads borrow.
- ``distill_weight`` = 1.0: loss = heads' loss + distill_weight * KL(original target || adapted target) on the
  next-token distributions at the positions that predict a target-written token.
- ``lora_lr`` = None: the trainer's lr; the paper gives the heads a larger lr than the backbone, so the
  Medusa-2 recipes set a smaller one here.
- ``heads_warmup_steps`` = 0: optimizer steps that train the heads alone before the adapters start (with their
  own warmup and cosine decay over the rest of the run). The paper's heads warmup: fresh heads would otherwise
  push large gradients into the target.

Use: ``MedusaDrafter(MedusaConfig())``, then ``bind(target_model)`` (builds the heads when the sizes came
from the target) before training or decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from draftsmith.drafters.base import DecodeState, register
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.multihead import MultiHeadConfig, MultiHeadDrafter, VocabHeads

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BORROWED_MODULES = {"lm_head", "embed_tokens"}


@dataclass
class MedusaConfig(MultiHeadConfig):
    kind: ClassVar[str] = "medusa"

    num_layers: int = 1
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    distill_weight: float = 1.0
    lora_lr: float | None = None
    heads_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 0 or self.tree_topk < 1:
            raise DraftsmithError("medusa needs num_heads >= 1, num_layers >= 0 and tree_topk >= 1")
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0 or self.distill_weight < 0:
            raise DraftsmithError("medusa needs lora_rank >= 0, 0 <= lora_dropout < 1 and distill_weight >= 0")
        if self.heads_warmup_steps < 0:
            raise DraftsmithError(f"medusa heads_warmup_steps={self.heads_warmup_steps}: give a count >= 0")
        if self.lora_lr is not None and self.lora_lr <= 0:
            raise DraftsmithError(f"medusa lora_lr={self.lora_lr}: give a positive learning rate (null = trainer.lr)")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self.lora_target_modules = [str(name) for name in self.lora_target_modules]
        if self.lora_rank and not self.lora_target_modules:
            raise DraftsmithError("medusa-2 (lora_rank > 0) needs lora_target_modules: the target's projections")
        borrowed = sorted(set(self.lora_target_modules) & BORROWED_MODULES)
        if borrowed:
            raise DraftsmithError(f"lora_target_modules names {', '.join(borrowed)}: the heads borrow it frozen")
        super().__post_init__()

    @property
    def adapts_target(self) -> bool:
        """Medusa-2: the target is trained (and served) with a LoRA adapter."""
        return self.lora_rank > 0


@register
class MedusaDrafter(MultiHeadDrafter):
    config_class = MedusaConfig
    config: MedusaConfig

    def _build(self) -> None:
        c = self.config
        self.heads = VocabHeads(c.num_heads, c.hidden_size, c.num_layers, c.projection_rows, c.share_lm_head)
        self.built = True

    def head_inputs(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden[:, :, None].expand(-1, -1, self.config.num_heads, -1)  # every head reads h_t

    def root_head_inputs(self, state: DecodeState) -> torch.Tensor:
        return state.hidden[-1][-1].expand(self.config.num_heads, -1)
