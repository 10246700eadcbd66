"""The feature-drafter backbone EAGLE-3 and ParallelSpec share.

Per position t the drafter reads the target's hidden states of a few layers at t (default low / middle /
high), projects their concatenation to its width (``fc``) and fuses the result with the embedding of the
token that follows, x_{t+1} (the target's own input embeddings, borrowed and frozen). One decoder layer of
the target's architecture (Llama: RMSNorm, grouped-query attention with RoPE, SiLU-gated MLP) turns that into
a feature; a final norm and an LM head give the distribution of x_{t+2}. The layer's output before the final
norm is itself a feature: drafting a token further feeds it back in place of the target's.

The layer follows EAGLE-3's "midlayer": the token embedding and the feature are normed separately and
concatenated, so attention reads 2 x width inputs; the residual stream is the un-normed feature. Parameter
names follow transformers' Llama layer so an export maps one to one onto the engines' EAGLE-3 checkpoints.

The drafter keeps its own KV cache (`FeatureCache`) over the verified positions: a position's entry is final
once computed (its feature and next token are verified), so each proposal computes only the new positions
and rolls back whatever it computed for unverified draft tokens by truncating the cache to the verified length.

Config fields (default):
- ``feature_layers`` = None: indices into transformers' ``hidden_states`` (0 = embeddings, i = after decoder
  layer i); None = ``[2, L // 2, L - 3]`` for an L-layer target (the speculators' choice).
- ``dim`` / ``attention_heads`` / ``kv_heads`` / ``ffn_size`` / ``rope_base`` = None: the target's.
- ``loss_type`` = "ce": cross-entropy on the target-written token; "kl": KL(target || drafter) to the target's
  distribution (needs its logits). ``loss_decay`` = 0.8 per draft position.
- ``topk`` = 4: the ranks at which training counts hits (``LossOutput.hits``).
- ``draft_vocab`` = None: the whole vocabulary; N = the LM head has the N rows of the map built from the
  distilled data (`drafters.draft_vocab`), started from the target's rows of it.
- ``hidden_size`` / ``vocab_size`` / ``target_layers`` / ``target_heads`` ... = None: taken from the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.drafters.base import Drafter, DrafterConfig, LossOutput, TargetNeeds
from draftsmith.drafters.draft_vocab import DraftVocab, check_size, install
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.multihead import Borrowed, multi_head_loss

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FeatureDrafterConfig(DrafterConfig):
    feature_layers: list[int] | None = None
    dim: int | None = None
    attention_heads: int | None = None
    kv_heads: int | None = None
    ffn_size: int | None = None
    rope_base: float | None = None
    rms_eps: float = 1e-5
    loss_type: str = "ce"
    loss_decay: float = 0.8
    topk: int = 4
    hidden_size: int | None = None
    vocab_size: int | None = None
    target_layers: int | None = None
    draft_vocab: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in ("ce", "kl"):
            raise DraftsmithError(f"{self.kind} loss_type must be 'ce' or 'kl', got {self.loss_type!r}")
        if self.topk < 1 or not 0 < self.loss_decay <= 1:
            raise DraftsmithError(f"{self.kind} needs topk >= 1 and 0 < loss_decay <= 1")
        check_size(self.kind, self.draft_vocab, candidates=getattr(self, "tree_topk", 1))
        if self.feature_layers is not None:
            self.feature_layers = [int(layer) for layer in self.feature_layers]

    def layers(self) -> tuple[int, ...]:
        if self.feature_layers:
            return tuple(self.feature_layers)
        if self.target_layers is None:
            raise DraftsmithError(f"the {self.kind} drafter does not know its target yet: bind it first")
        n = self.target_layers
        return (min(2, n), n // 2, max(n - 3, 0))

    def target_needs(self) -> TargetNeeds:
        return TargetNeeds(hidden_layers=self.layers(), logits=self.loss_type == "kl")

    def adopt_target(self, config: Any) -> None:
        """Take the target's sizes and shape; a drafter saved for other sizes belongs to another target."""
        values = {
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "target_layers": config.num_hidden_layers,
        }
        for name, have in values.items():
            wanted = getattr(self, name)
            if wanted is not None and wanted != have:
                raise DraftsmithError(f"this drafter has {name}={wanted} but the target has {have}: use its own target")
            setattr(self, name, have)
        check_size(self.kind, self.draft_vocab, config.vocab_size)
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 1e4))
        defaults = {
            "dim": config.hidden_size,
            "attention_heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "ffn_size": config.intermediate_size,
            "rope_base": float(rope),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.rms_eps = float(getattr(config, "rms_norm_eps", self.rms_eps))


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE (rotate-half layout, as Llama) on ``x [B, heads, T, head_dim]`` at ``positions [B, T]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention reading ``in_dim`` inputs; keys/values are returned for the caller's cache."""

    def __init__(self, in_dim: int, dim: int, heads: int, kv_heads: int, rope_base: float) -> None:
        super().__init__()
        if dim % heads or heads % kv_heads or (dim // heads) % 2:
            raise DraftsmithError(f"width {dim} must split into {heads} heads of even size, a multiple of {kv_heads}")
        self.heads, self.kv_heads, self.head_dim, self.rope_base = heads, kv_heads, dim // heads, rope_base
        self.q_proj = nn.Linear(in_dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, heads, T, d]`` and keys/values ``[B, kv_heads, T, d]`` for ``x [B, T, in_dim]``."""
        batch, length, _ = x.shape

        def split(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, length, n, self.head_dim).transpose(1, 2)

        q = rotate(split(self.q_proj(x), self.heads), positions, self.rope_base)
        k = rotate(split(self.k_proj(x), self.kv_heads), positions, self.rope_base)
        return q, k, split(self.v_proj(x), self.kv_heads)

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class FusedLayer(nn.Module):
    """EAGLE-3's decoder layer over (token embedding, feature) pairs (see the module docstring)."""

    def __init__(self, c: FeatureDrafterConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.dim, eps=c.rms_eps)
        self.hidden_norm = nn.RMSNorm(c.dim, eps=c.rms_eps)
        self.self_attn = Attention(2 * c.dim, c.dim, c.attention_heads, c.kv_heads, c.rope_base)
        self.post_attention_layernorm = nn.RMSNorm(c.dim, eps=c.rms_eps)
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(c.dim, c.ffn_size, bias=False),
                "up_proj": nn.Linear(c.dim, c.ffn_size, bias=False),
                "down_proj": nn.Linear(c.ffn_size, c.dim, bias=False),
            }
        )

    def qkv(
        self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(features)], dim=-1)
        return self.self_attn.project(x, positions)

    def finish(self, features: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention (``attended [B, heads, T, d]``), then the MLP."""
        h = features + self.self_attn.output(attended)
        x = self.post_attention_layernorm(h)
        return h + self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](x)) * self.mlp["up_proj"](x))

    def forward(
        self,
        embeds: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """``mask [B, 1, T, past + T]`` (True = may attend); returns the new features and these keys/values."""
        q, k, v = self.qkv(embeds, features, positions)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        attn = self.self_attn
        attended = F.scaled_dot_product_attention(q, attn.expand(keys), attn.expand(values), attn_mask=mask)
        return self.finish(features, attended), (k, v)


class FeatureBackbone(nn.Module):
    """``fc`` over the concatenated target features, the fused layer, the final norm and the LM head.

    The LM head is the drafter's own (trainable), initialised from the target's (its rows of the draft vocabulary
    map, with ``draft_vocab``) by `init_lm_head`; the input embeddings are the target's, borrowed (never saved).
    """

    def __init__(self, c: FeatureDrafterConfig) -> None:
        super().__init__()
        layers = len(c.layers())
        self.fc = nn.Linear(layers * c.hidden_size, c.dim, bias=False)
        self.embed_proj = nn.Identity() if c.dim == c.hidden_size else nn.Linear(c.hidden_size, c.dim, bias=False)
        self.midlayer = FusedLayer(c)
        self.norm = nn.RMSNorm(c.dim, eps=c.rms_eps)
        self.lm_head = nn.Linear(c.dim, c.draft_vocab or c.vocab_size, bias=False)
        # saved with the weights, so binding a trained drafter to its target never overwrites its LM head
        self.register_buffer("lm_head_initialised", torch.tensor(False))
        self.borrowed = Borrowed()

    def bind(self, target: nn.Module, vocab_map: DraftVocab | None = None) -> None:
        self.borrowed.set("embeddings", target.get_input_embeddings())
        head = target.get_output_embeddings()
        if head is None:
            raise DraftsmithError(f"{type(target).__name__} has no LM head for the drafter's to start from")
        self.borrowed.set("target_lm_head", head)
        self.init_lm_head(vocab_map)

    def init_lm_head(self, vocab_map: DraftVocab | None) -> None:
        """Start the LM head from the target's (its rows of ``vocab_map``), once: not after training or loading
        set it, and not before a draft vocabulary's map exists."""
        if bool(self.lm_head_initialised) or (vocab_map is not None and not vocab_map.ready):
            return
        weight = self.borrowed.get("target_lm_head", self.lm_head.weight.device, self.lm_head.weight.dtype)
        rows = weight if vocab_map is None else vocab_map.rows(weight)
        if rows.shape != self.lm_head.weight.shape:
            raise DraftsmithError("the drafter's LM head cannot start from the target's: their shapes differ")
        with torch.no_grad():
            self.lm_head.weight.copy_(rows)
            self.lm_head_initialised.fill_(True)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.borrowed.get("embeddings", self.fc.weight.device, self.fc.weight.dtype)
        return self.embed_proj(F.embedding(tokens.to(weight.device), weight))

    def fuse(self, hidden: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
        """``fc`` over the target's hidden states of ``layers``, concatenated on the last dimension."""
        return self.fc(torch.cat([hidden[layer].to(self.fc.weight) for layer in layers], dim=-1))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(features))


class FeatureCache:
    """The drafter's KV cache over verified positions ``0 .. length - 1``, truncated on rollback."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]

    def append(self, kv: KeyValue) -> None:
        k, v = kv
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 2)
        self.values = v if self.values is None else torch.cat([self.values, v], 2)


def step_zero(
    backbone: FeatureBackbone,
    cache: FeatureCache,
    hidden: dict[int, torch.Tensor],
    tokens: torch.Tensor,
    layers: tuple[int, ...],
    new_from: int,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Bring ``cache`` up to the verified positions; return the output feature at the last one (``[dim]``), or
    with ``extra = (embeds [m, dim], features [m, dim])`` also those m rows' outputs after it (``[1 + m, dim]``).

    Position t pairs the target's features at t with token t+1; positions from ``min(cache, new_from)`` on are
    (re)computed, at least the last one so a repeated call is consistent. Extra rows sit at the positions after
    the last verified one, see every verified position and the extra rows before them, and leave no trace in
    the cache.
    """
    count = next(iter(hidden.values())).shape[0]
    start = min(cache.length, new_from, count - 1)
    cache.truncate(start)
    features = backbone.fuse({layer: hidden[layer][start:count] for layer in layers}, layers)
    embeds = backbone.embed(tokens[start + 1 : count + 1])
    if extra is not None:
        embeds, features = torch.cat([embeds, extra[0]]), torch.cat([features, extra[1]])
    rows = features.shape[0]
    positions = torch.arange(start, start + rows, device=features.device)
    mask = positions[:, None] >= torch.arange(start + rows, device=features.device)[None, :]
    past = None if cache.keys is None else (cache.keys, cache.values)
    out, (k, v) = backbone.midlayer(embeds[None], features[None], positions[None], mask[None, None], past)
    verified = count - start
    cache.append((k[:, :, :verified], v[:, :, :verified]))
    return out[0, verified - 1] if extra is None else out[0, verified - 1 :]


def check_features(c: FeatureDrafterConfig, features: dict[str, Any]) -> tuple[dict, torch.Tensor | None]:
    """The hidden states a feature drafter reads and, for ``loss_type`` "kl", the target's logits (else None)."""
    hidden = features.get("hidden", {})
    if any(layer not in hidden for layer in c.layers()):
        raise DraftsmithError(f"features lack the target's hidden layers {list(c.layers())}: compute them")
    if c.loss_type != "kl":
        return hidden, None
    if features.get("logits") is None:
        raise DraftsmithError("loss_type=kl needs the target's logits in the features: enable them or use ce")
    return hidden, features["logits"]


class FeatureDrafter(Drafter):
    """What EAGLE-3 and ParallelSpec share: the backbone (built once the target's sizes are known), binding,
    the drafter's KV cache, the draft vocabulary map (``vocab_map``, with ``draft_vocab``) and the loss over their
    draft positions. A kind adds its own modules in `_build`; its proposals go through `draft_vocab.full_ids`."""

    config: FeatureDrafterConfig

    def __init__(self, config: FeatureDrafterConfig) -> None:
        super().__init__(config)
        self.vocab_map = DraftVocab(config.draft_vocab) if config.draft_vocab else None
        self.backbone: FeatureBackbone | None = None
        if config.hidden_size is not None and config.dim is not None:
            self._build()
        self.reset()

    def _build(self) -> None:
        self.backbone = FeatureBackbone(self.config)

    def target_needs(self) -> TargetNeeds:
        return self.config.target_needs()

    def bind(self, target: nn.Module) -> None:
        self.config.adopt_target(target.config)
        if self.backbone is None:
            self._build()
            self.to(target.get_input_embeddings().weight.device)
        self.backbone.bind(target, self.vocab_map)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Install the draft vocabulary training built; a bound drafter's LM head starts from its rows."""
        vocab_map = install(self.vocab_map, self.config.kind, ids)
        if self.backbone is not None and "target_lm_head" in self.backbone.borrowed:
            self.backbone.init_lm_head(vocab_map)

    def _built(self) -> FeatureBackbone:
        if self.backbone is None:
            raise DraftsmithError(
                f"the {self.config.kind} drafter is not built yet: call drafter.bind(target_model) first"
            )
        return self.backbone

    def reset(self) -> None:
        self.cache = FeatureCache()

    def position_loss(
        self, outputs: list[torch.Tensor], batch: dict[str, torch.Tensor], reference: torch.Tensor | None, topk: int
    ) -> LossOutput:
        """``outputs[d] [B, T-1, dim]``: the features whose index t drafts token t + 2 + d (draft position d),
        scored by the multi-head loss (`multihead.multi_head_loss`: head d + 1 is draft position d)."""
        backbone = self._built()

        def logits(k: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return backbone.logits(outputs[k - 1][rows, positions])

        c = self.config
        return multi_head_loss(logits, batch, len(outputs), c.loss_decay, topk, reference, self.vocab_map)
