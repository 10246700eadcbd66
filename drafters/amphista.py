"""Amphista (Li et al., NAACL 2025): Medusa heads that see each other, on adapted target features.

Data flow for position t (h_t = the target's last hidden state, after its final norm; x_{t+1} = the token
that follows, i.e. the token the target chose from h_t):

1. Fusion: ``f_t = Linear([h_t ; emb(x_{t+1})])`` with the target's own input embeddings (borrowed, frozen).
2. Staged Adaptation Layers: a causal stack of pre-norm transformer decoder layers over f_0..f_t.
   Choice: stages are *cumulative*: stage s is the output after ``s * layers_per_stage`` layers of one
   stack (stage 2 continues from stage 1), so S stages cost S * layers_per_stage layers, not S(S+1)/2.
   Choice: the layers are self-written (RMSNorm, multi-head attention with RoPE, SiLU MLP), so decoding
   keeps its own incremental KV cache: every position t < L-1 is final once computed, because x_{t+1} is
   already verified.
3. Heads are split into S contiguous groups, as even as possible, earlier groups taking the remainder
   (4 heads, 2 stages: heads 1-2 read stage 1, heads 3-4 read stage 2).
4. Auto-embedding Block: slot k = its group's stage output + learned position embedding k; one
   bidirectional transformer encoder layer (torch's ``nn.TransformerEncoderLayer``, pre-norm, SiLU) runs
   over the K slots of a position, so every head sees every other head.
5. Slot k -> head k (``head_layers`` residual blocks, then the vocab projection) -> logits. Head k
   (1-based) predicts x_{t+k+1}, like Medusa's head k.

Choices the paper leaves open (config field, default):
- ``num_heads`` = 4, ``num_stages`` = 2, ``layers_per_stage`` = 1, ``head_layers`` = 1.
- ``dim`` = None (the target's hidden size); ``attention_heads`` = 8; ``ffn_size`` = None (2 x dim);
  ``rope_base`` = 10000; ``dropout`` = 0.
- ``identity_init`` = True: the fusion starts as [I 0], every residual branch's output projection and the
  slot position embeddings start at zero, so a fresh Amphista computes exactly what a fresh Medusa does
  (every head = the target's own head) and training starts from there. Needs dim == hidden size.
- ``share_lm_head`` = True (borrowed, frozen target head; False = a trainable copy per head).
- ``loss_type`` = "ce": cross-entropy on the target-written tokens; "kl" = KL(target || head) to the
  target's distribution, which needs the target's logits in the features (``TargetNeeds(logits=True)``).
- ``loss_decay`` = 0.8 (weights 0.8**(k-1)); ``tree`` / ``tree_nodes`` = 63 / ``tree_topk`` = 10 as Medusa.
- ``hidden_size`` / ``vocab_size`` = None: taken from the target when the drafter is first bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.drafters.backbone import rotate
from draftsmith.drafters.base import DecodeState, register
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.multihead import MultiHeadConfig, MultiHeadDrafter, VocabHeads

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AmphistaConfig(MultiHeadConfig):
    kind: ClassVar[str] = "amphista"

    num_stages: int = 2
    layers_per_stage: int = 1
    head_layers: int = 1
    dim: int | None = None
    attention_heads: int = 8
    ffn_size: int | None = None
    rope_base: float = 10000.0
    dropout: float = 0.0
    identity_init: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.num_stages <= self.num_heads:
            raise DraftsmithError(
                f"amphista needs 1 <= num_stages <= num_heads, got {self.num_stages} and {self.num_heads}"
            )
        if self.layers_per_stage < 1 or self.head_layers < 0 or self.tree_topk < 1:
            raise DraftsmithError("amphista needs layers_per_stage >= 1, head_layers >= 0 and tree_topk >= 1")
        super().__post_init__()

    def head_groups(self) -> list[int]:
        """Stage index each head reads: contiguous groups, earlier groups one larger when K % S != 0."""
        sizes = [len(group) for group in torch.arange(self.num_heads).tensor_split(self.num_stages)]
        return [stage for stage, size in enumerate(sizes) for _ in range(size)]


class CausalLayer(nn.Module):
    """Pre-norm decoder layer: RMSNorm -> causal self-attention with RoPE -> RMSNorm -> SiLU MLP."""

    def __init__(self, dim: int, heads: int, ffn: int, rope_base: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.rope_base, self.dropout = heads, rope_base, dropout
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.SiLU(), nn.Linear(ffn, dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: KeyValue | None = None
    ) -> tuple[torch.Tensor, KeyValue]:
        """``x [B, T, D]``; ``mask [B, 1, T, past + T]`` (True = may attend); returns the output and the
        keys/values of past + these positions."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, positions, self.rope_base), rotate(k, positions, self.rope_base)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.mlp_norm(x)), (k, v)


@register
class AmphistaDrafter(MultiHeadDrafter):
    config_class = AmphistaConfig
    config: AmphistaConfig

    def __init__(self, config: AmphistaConfig) -> None:
        self.groups = config.head_groups()
        self._cache: list[KeyValue] = []
        self._cached_positions = 0
        super().__init__(config)

    def _build(self) -> None:
        c = self.config
        hidden = c.hidden_size
        dim = c.dim or hidden
        ffn = c.ffn_size or 2 * dim
        if dim % c.attention_heads or (dim // c.attention_heads) % 2:
            raise DraftsmithError(f"dim={dim} must split into attention_heads={c.attention_heads} heads of even size")
        if c.identity_init and dim != hidden:
            raise DraftsmithError(
                f"identity_init needs dim == hidden size ({hidden}); set dim=null or identity_init=false"
            )
        self.fuse = nn.Linear(2 * hidden, dim)
        self.layers = nn.ModuleList(
            CausalLayer(dim, c.attention_heads, ffn, c.rope_base, c.dropout)
            for _ in range(c.num_stages * c.layers_per_stage)
        )
        self.slot_positions = nn.Parameter(torch.randn(c.num_heads, dim) * 0.02)
        self.auto_embedding = nn.TransformerEncoderLayer(
            dim, c.attention_heads, ffn, c.dropout, activation=F.silu, batch_first=True, norm_first=True
        )
        self.to_hidden = nn.Identity() if dim == hidden else nn.Linear(dim, hidden, bias=False)
        self.heads = VocabHeads(c.num_heads, hidden, c.head_layers, c.projection_rows, c.share_lm_head)
        if c.identity_init:
            self._init_identity()
        self.built = True

    @torch.no_grad()
    def _init_identity(self) -> None:
        hidden = self.config.hidden_size
        self.fuse.weight.zero_()
        self.fuse.weight[:, :hidden].copy_(torch.eye(hidden))
        self.fuse.bias.zero_()
        self.slot_positions.zero_()
        residual_outputs = [self.auto_embedding.self_attn.out_proj, self.auto_embedding.linear2]
        for layer in self.layers:
            residual_outputs += [layer.attn_out, layer.mlp[2]]
        for linear in residual_outputs:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()

    def borrow(self, target: nn.Module) -> None:
        embeddings = target.get_input_embeddings()
        hidden = target.get_output_embeddings().weight.shape[1]
        if embeddings.weight.shape[1] != hidden:
            raise DraftsmithError(
                f"amphista needs embeddings as wide as the hidden state; {type(target).__name__} differs"
            )
        self.borrowed.set("embeddings", embeddings)

    def _embeddings(self) -> torch.Tensor:
        if not self.built:
            raise DraftsmithError("the amphista drafter is not built yet: call drafter.bind(target_model) first")
        return self.borrowed.get("embeddings", self.fuse.weight.device, self.fuse.weight.dtype)

    def slot_inputs(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Slot k = the output of head k's stage + position embedding k: ``[..., D]`` each -> ``[..., K, D]``."""
        return torch.stack([stages[group] for group in self.groups], dim=-2) + self.slot_positions

    def auto_embed(self, slots: torch.Tensor) -> torch.Tensor:
        """Auto-embedding Block: per position, the K slots attend to each other. ``[..., K, D]`` -> ``[..., K, H]``."""
        lead = slots.shape[:-2]
        mixed = self.auto_embedding(slots.reshape(-1, *slots.shape[-2:]))
        return self.to_hidden(mixed.reshape(*lead, *mixed.shape[-2:]))

    def _stages(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: bool) -> list[torch.Tensor]:
        stages = []
        for index, layer in enumerate(self.layers):
            past = self._cache[index] if cache else None
            x, present = layer(x, positions, mask, past)
            if cache:
                self._cache[index] = present
            if (index + 1) % self.config.layers_per_stage == 0:
                stages.append(x)
        return stages

    # -- training ------------------------------------------------------------------------------

    def head_inputs(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every head's input ``[B, T-1, K, H]`` for positions 0..T-2 (position T-1 has no next token)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        embeddings = self._embeddings()
        x = self.fuse(torch.cat([hidden[:, :-1], F.embedding(input_ids[:, 1:], embeddings)], dim=-1))
        inside = attention_mask[:, :-1].bool()
        positions = (inside.long().cumsum(1) - 1).clamp_min(0)
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # Padding queries may still see themselves, so no row is fully masked (which would give NaN).
        mask = (causal & inside[:, None, :]) | torch.eye(length, dtype=torch.bool, device=x.device)
        return self.auto_embed(self.slot_inputs(self._stages(x, positions, mask[:, None], cache=False)))

    # -- decoding ------------------------------------------------------------------------------

    def reset(self) -> None:
        self._cache = []
        self._cached_positions = 0

    @torch.no_grad()
    def root_head_inputs(self, state: DecodeState) -> torch.Tensor:
        """Every head's input ``[K, H]`` at the position that produced the root token.

        Runs the adaptation layers only over positions not yet in this drafter's cache (at least the last
        one, so a repeated call is consistent), then the slots and heads at the last position only.
        """
        hidden = state.hidden[-1]
        count = hidden.shape[0]  # positions 0..L-2; position t pairs h_t with tokens[t+1]
        start = min(self._cached_positions, state.new_from, count - 1)
        if start == 0:
            self._cache = [None] * len(self.layers)
        else:  # positions from `start` on are recomputed: drop what the cache holds for them
            self._cache = [(keys[:, :, :start], values[:, :, :start]) for keys, values in self._cache]
        embeddings = self._embeddings()
        new_tokens = state.tokens[start + 1 : count + 1].to(embeddings.device)
        x = self.fuse(torch.cat([hidden[start:count].to(embeddings), F.embedding(new_tokens, embeddings)], dim=-1))
        positions = torch.arange(start, count, device=x.device)
        mask = positions[:, None] >= torch.arange(count, device=x.device)[None, :]
        stages = self._stages(x[None], positions[None], mask[None, None], cache=True)
        self._cached_positions = count
        return self.auto_embed(self.slot_inputs([stage[0, -1] for stage in stages]))
