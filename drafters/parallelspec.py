"""ParallelSpec (Xiao et al. 2024): the fused-feature backbone drafting k tokens in ONE forward with mask tokens.

After the last verified position p (whose output predicts the first draft token, as in EAGLE), k - 1 learned
mask tokens sit at positions p+1 .. p+k-1; mask j's output predicts the token j steps further. A mask token's
input is a learned embedding and a learned feature (choice: the paper gives masks only an embedding; the
backbone's layer needs a feature too). The tree comes from the per-position top candidates: position d's top
``tree_topk`` tokens are hung in the rank-path tree of `drafters.rank_trees`, built from the per-position,
per-rank accuracies measured on the validation split (the same service Medusa's heads use).

Group-wise training: after every position t of a training sequence, a group of k - 1 masks at positions
t+1 .. t+k-1; each group sees the prefix up to t and itself only (masks causally among themselves, as in
decoding), so all groups of a sequence train in one pass. The attention is one FlexAttention call with a
block-sparse mask over [prefix ; groups] (`group_mask_mod`), so no dense (L x kL) mask is built at the GPU
recipes' lengths; FlexAttention has no backward on a CPU, where the same mask is written out for SDPA (the CPU
recipes' sequences are short). Loss per draft position d: CE on the target's
token (or KL to its distribution), weighted ``loss_decay ** d``.

Fields (default), besides the backbone's (`drafters.backbone`):
- ``parallel_tokens`` = 4: draft positions per forward (the root's output plus 3 masks).
- ``tree`` / ``tree_nodes`` = 15 / ``tree_topk`` = 10 / ``rank_acc``: as Medusa's.
- ``compile_attention`` = "auto": compile the FlexAttention call on CUDA ("never": run it eagerly).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from draftsmith.drafters.backbone import FeatureDrafter, FeatureDrafterConfig, check_features, step_zero
from draftsmith.drafters.base import DecodeState, Draft, LossOutput, register
from draftsmith.drafters.draft_vocab import full_ids
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.rank_trees import TreeMixin, tree_draft


@dataclass
class ParallelSpecConfig(FeatureDrafterConfig):
    kind: ClassVar[str] = "parallelspec"

    parallel_tokens: int = 4
    tree: list[list[int]] | None = None
    tree_nodes: int = 15
    tree_topk: int = 10
    rank_acc: list[list[float]] | None = None
    compile_attention: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parallel_tokens < 2 or self.tree_topk < 1:
            raise DraftsmithError(
                "parallelspec needs parallel_tokens >= 2 (one is EAGLE's first step) and tree_topk >= 1"
            )
        if self.compile_attention not in ("auto", "never"):
            raise DraftsmithError(f"compile_attention={self.compile_attention!r}: use auto or never")
        if self.tree is not None:
            self.tree = [[int(r) for r in path] for path in self.tree]

    @property
    def num_heads(self) -> int:
        """Draft positions, under the name the rank-path trees use."""
        return self.parallel_tokens


def group_mask_mod(n: int, masks: int, inside: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention mask over ``[prefix (n) ; groups (n x masks, group-major)]``: a prefix row sees the real
    prefix rows up to itself; mask j of group t sees the real prefix rows up to t and masks 0..j of group t.
    A padding row still sees itself, so no row is empty."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_group, kv_group = (q - n) // masks, (kv - n) // masks
        q_prefix, kv_prefix = q < n, kv < n
        upto = torch.where(q_prefix, q, q_group)
        real = inside[b, kv.clamp(max=n - 1)]
        sees_prefix = kv_prefix & (kv <= upto) & (real | (kv == q))
        sees_group = ~q_prefix & ~kv_prefix & (q_group == kv_group) & (kv <= q)
        return sees_prefix | sees_group

    return mask_mod


def flex_group_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: Callable, rows: int, compile_it: bool
) -> torch.Tensor:
    """One block-sparse FlexAttention call over all groups (no dense mask is built)."""
    block_mask = create_block_mask(mask_mod, q.shape[0], None, rows, rows, device=q.device)
    attend = torch.compile(flex_attention) if compile_it else flex_attention
    with warnings.catch_warnings():  # eager FlexAttention warns that it is not the fused kernel
        warnings.filterwarnings("ignore", message=".*flex_attention.*", category=UserWarning)
        return attend(q, k, v, block_mask=block_mask, enable_gqa=True)


@register
class ParallelSpecDrafter(TreeMixin, FeatureDrafter):
    config_class = ParallelSpecConfig
    config: ParallelSpecConfig

    def __init__(self, config: ParallelSpecConfig) -> None:
        super().__init__(config)
        self.draft_tree()

    def _build(self) -> None:
        super()._build()
        c = self.config
        self.mask_embeds = nn.Parameter(torch.randn(c.parallel_tokens - 1, c.dim) * 0.02)
        self.mask_features = nn.Parameter(torch.randn(c.parallel_tokens - 1, c.dim) * 0.02)

    # -- training ------------------------------------------------------------------------------

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: Callable, rows: int) -> torch.Tensor:
        """FlexAttention where it trains (CUDA); on a CPU, where it has no backward, SDPA with the same mask
        written out (the CPU recipes' sequences are short)."""
        if q.is_cuda:
            return flex_group_attention(q, k, v, mask_mod, rows, self.config.compile_attention != "never")
        grid = torch.arange(rows, device=q.device)
        batch = torch.arange(q.shape[0], device=q.device)[:, None, None]
        dense = mask_mod(batch, 0, grid[None, :, None], grid[None, None, :])
        repeat = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), attn_mask=dense[:, None]
        )

    def group_outputs(
        self, input_ids: torch.Tensor, inside: torch.Tensor, hidden: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """Output features ``[B, T-1, k, dim]``: draft position 0 from the prefix row t, position j from mask j
        of group t (see the module docstring)."""
        c, backbone = self.config, self._built()
        layers = c.layers()
        batch_size, length = input_ids.shape
        n, masks = length - 1, c.parallel_tokens - 1
        prefix = backbone.fuse({layer: hidden[layer][:, :n] for layer in layers}, layers)
        features = torch.cat([prefix, self.mask_features.repeat(n, 1).expand(batch_size, -1, -1)], dim=1)
        embeds = torch.cat(
            [backbone.embed(input_ids[:, 1:]), self.mask_embeds.repeat(n, 1).expand(batch_size, -1, -1)], dim=1
        )
        group_positions = (torch.arange(n)[:, None] + torch.arange(1, masks + 1)[None, :]).flatten()
        positions = torch.cat([torch.arange(n), group_positions]).to(prefix.device).expand(batch_size, -1)
        q, k, v = backbone.midlayer.qkv(embeds, features, positions)
        rows = n * (1 + masks)
        attended = self._attend(q, k, v, group_mask_mod(n, masks, inside[:, :n]), rows)
        out = backbone.midlayer.finish(features, attended)
        groups = out[:, n:].reshape(batch_size, n, masks, -1)
        return torch.cat([out[:, :n, None], groups], dim=2)

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> LossOutput:
        hidden, reference = check_features(self.config, features)
        outputs = self.group_outputs(batch["input_ids"], batch["attention_mask"].bool(), hidden)
        positions = [outputs[:, :, d] for d in range(self.config.parallel_tokens)]
        return self.position_loss(positions, batch, reference, self.config.tree_topk)

    # -- decoding ------------------------------------------------------------------------------

    def max_draft_nodes(self) -> int:
        return len(self.draft_tree().paths)

    @torch.no_grad()
    def draft_logits(self, state: DecodeState) -> torch.Tensor:
        """Every draft position's logits ``[k, V]``: the root row and the k - 1 masks, in one forward."""
        backbone = self._built()
        extra = (self.mask_embeds, self.mask_features)
        out = step_zero(backbone, self.cache, state.hidden, state.tokens, self.config.layers(), state.new_from, extra)
        return backbone.logits(out)

    def propose(self, state: DecodeState) -> Draft:
        if state.hidden[self.config.layers()[0]].shape[0] == 0:
            return Draft.empty()
        tree = self.draft_tree()
        topk_tokens = full_ids(self.vocab_map, self.draft_logits(state).topk(tree.max_rank + 1, dim=-1).indices)
        return tree_draft(tree, topk_tokens.cpu())  # the engine keeps its token buffer on the CPU
