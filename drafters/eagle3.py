"""EAGLE-3 (Li et al. 2025): autoregressive drafting at the feature level on the fused-feature backbone.

Training-time test (``ttt_steps`` = n): the training step unrolls the drafter on its own features for n
steps. Step 0 at position t reads the target's features at t and token x_{t+1} and predicts x_{t+2}; step i at
the same index t reads step i-1's output feature there and token x_{t+1+i}, sits at position t+i and predicts
x_{t+2+i}. It attends to step 0's keys up to t and to steps 1..i's keys at index t only, which is exactly what
a draft token at depth i+1 sees while decoding (the verified positions, then its own ancestors). Step i's loss
is weighted ``loss_decay ** i``; teacher forcing on the tokens, the drafter's own features (as the reference
trainers do).

Decoding grows EAGLE-2's dynamic tree from the drafter's own confidence: the root's feature gives the first
``tree_topk`` candidates; for ``tree_depth - 1`` rounds the ``tree_topk`` most confident nodes of the newest
depth are expanded (one forward of the fused layer for all of them, each attending to the verified cache and
its ancestors), each adding its top ``tree_topk`` children; a node's confidence is the product of the draft
probabilities along its path. The ``tree_nodes`` most confident nodes are verified (their ancestors are
always at least as confident, so the set is a tree). ``tree_topk`` = 1 drafts a chain.

Fields (default), besides the backbone's (`drafters.backbone`):
- ``ttt_steps`` = 3 (speculators' choice; SpecForge uses 7).
- ``tree_nodes`` = 16, ``tree_depth`` = 6, ``tree_topk`` = 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from draftsmith.drafters.backbone import (
    FeatureBackbone,
    FeatureDrafter,
    FeatureDrafterConfig,
    check_features,
    step_zero,
)
from draftsmith.drafters.base import DecodeState, Draft, LossOutput, register
from draftsmith.drafters.draft_vocab import full_ids
from draftsmith.drafters.errors import DraftsmithError


@dataclass
class Eagle3Config(FeatureDrafterConfig):
    kind: ClassVar[str] = "eagle3"

    ttt_steps: int = 3
    tree_nodes: int = 16
    tree_depth: int = 6
    tree_topk: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ttt_steps < 1 or self.tree_nodes < 1 or self.tree_depth < 1 or self.tree_topk < 1:
            raise DraftsmithError("eagle3 needs ttt_steps, tree_nodes, tree_depth and tree_topk >= 1")


@register
class Eagle3Drafter(FeatureDrafter):
    config_class = Eagle3Config
    config: Eagle3Config

    # -- training ------------------------------------------------------------------------------

    def unroll(
        self, input_ids: torch.Tensor, inside: torch.Tensor, hidden: dict[int, torch.Tensor]
    ) -> list[torch.Tensor]:
        """The training-time test: the drafter's output features ``[B, T-1, dim]`` of each of ``ttt_steps``
        steps (see the module docstring for what step i reads and attends to)."""
        c, backbone = self.config, self._built()
        layers = c.layers()
        batch_size, length = input_ids.shape
        n = length - 1  # positions 0..T-2 have a following token
        feature = backbone.fuse({layer: hidden[layer][:, :n] for layer in layers}, layers)
        positions = torch.arange(n, device=feature.device).expand(batch_size, -1)
        attn = backbone.midlayer.self_attn
        # step 0 attends causally over the real positions; padding queries see themselves so no row is empty
        causal = torch.ones(n, n, dtype=torch.bool, device=feature.device).tril()
        visible = (causal & inside[:, None, :n]) | torch.eye(n, dtype=torch.bool, device=feature.device)
        past: list[tuple[torch.Tensor, torch.Tensor]] = []
        outputs = []
        for step in range(c.ttt_steps):
            tokens = F.pad(input_ids[:, 1 + step :], (0, step), value=0)[:, :n]
            q, k, v = backbone.midlayer.qkv(backbone.embed(tokens), feature, positions + step)
            k, v = attn.expand(k), attn.expand(v)
            if step == 0:
                keys0, values0 = k, v
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
            else:
                past.append((k, v))
                scale = 1.0 / math.sqrt(q.shape[-1])
                scores0 = (q @ keys0.transpose(-1, -2) * scale).masked_fill(~visible[:, None], float("-inf"))
                own = torch.stack([(q * pk).sum(-1) * scale for pk, _ in past], dim=-1)
                weights = torch.softmax(torch.cat([scores0, own], dim=-1).float(), dim=-1).to(q.dtype)
                attended = weights[..., :n] @ values0
                for j, (_, pv) in enumerate(past):
                    attended = attended + weights[..., n + j, None] * pv
            feature = backbone.midlayer.finish(feature, attended)
            outputs.append(feature)
        return outputs

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> LossOutput:
        hidden, reference = check_features(self.config, features)
        outputs = self.unroll(batch["input_ids"], batch["attention_mask"].bool(), hidden)
        return self.position_loss(outputs, batch, reference, self.config.topk)

    # -- decoding ------------------------------------------------------------------------------

    def max_draft_nodes(self) -> int:
        return self.config.tree_nodes

    def set_draft_size(self, nodes: int) -> None:
        if nodes < 1:
            raise DraftsmithError(f"tree_nodes={nodes}: a draft needs at least one node")
        self.config.tree_nodes = nodes

    def draft_shape(self) -> dict[str, Any]:
        c = self.config
        return {"tree_nodes": c.tree_nodes, "tree_depth": c.tree_depth, "tree_topk": c.tree_topk}

    @torch.no_grad()
    def propose(self, state: DecodeState) -> Draft:
        c, backbone = self.config, self._built()
        layers = c.layers()
        if state.hidden[layers[0]].shape[0] == 0:
            return Draft.empty()
        root = step_zero(backbone, self.cache, state.hidden, state.tokens, layers, state.new_from)
        topk = min(c.tree_topk, c.tree_nodes)
        # nodes: token, parent (-1 = root), log-confidence, depth; computed nodes also keep feature and keys/values
        logp = torch.log_softmax(backbone.logits(root).float(), dim=-1).topk(topk)
        tokens, parents = full_ids(self.vocab_map, logp.indices).tolist(), [-1] * topk
        scores, depths = logp.values.tolist(), [1] * topk
        outputs: dict[int, torch.Tensor] = {}
        kv_index: dict[int, int] = {}
        tree_k: list[torch.Tensor] = []
        tree_v: list[torch.Tensor] = []
        frontier = list(range(topk))
        for depth in range(1, c.tree_depth):
            expand = sorted(frontier, key=lambda i: -scores[i])[:topk]
            out, k, v = self._expand(backbone, expand, tokens, parents, outputs, kv_index, tree_k, tree_v, root, depth)
            for row, node in enumerate(expand):
                outputs[node], kv_index[node] = out[row], len(tree_k)
                tree_k.append(k[:, :, row : row + 1])
                tree_v.append(v[:, :, row : row + 1])
            child = torch.log_softmax(backbone.logits(out).float(), dim=-1).topk(topk)
            child_tokens = full_ids(self.vocab_map, child.indices)
            frontier = []
            for row, node in enumerate(expand):
                for token, value in zip(child_tokens[row].tolist(), child.values[row].tolist()):
                    frontier.append(len(tokens))
                    tokens.append(token)
                    parents.append(node)
                    scores.append(scores[node] + value)
                    depths.append(depth + 1)
        return self._select(tokens, parents, scores, depths)

    def _expand(
        self,
        backbone: FeatureBackbone,
        nodes: list[int],
        tokens: list[int],
        parents: list[int],
        outputs: dict[int, torch.Tensor],
        kv_index: dict[int, int],
        tree_k: list[torch.Tensor],
        tree_v: list[torch.Tensor],
        root: torch.Tensor,
        depth: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the fused layer for ``nodes`` (all at ``depth``): each reads its parent's feature and its own
        token and attends to the verified cache, its computed ancestors and itself."""
        device = root.device
        features = torch.stack([root if parents[n] < 0 else outputs[parents[n]] for n in nodes])[None]
        embeds = backbone.embed(torch.tensor([tokens[n] for n in nodes], device=device))[None]
        cached = self.cache.length
        positions = torch.full((1, len(nodes)), cached - 1 + depth, device=device)
        q, k, v = backbone.midlayer.qkv(embeds, features, positions)
        computed = len(tree_k)
        visible = torch.zeros(len(nodes), cached + computed + len(nodes), dtype=torch.bool, device=device)
        visible[:, :cached] = True
        for row, node in enumerate(nodes):
            ancestor = parents[node]
            while ancestor >= 0:
                visible[row, cached + kv_index[ancestor]] = True
                ancestor = parents[ancestor]
            visible[row, cached + computed + row] = True
        keys = torch.cat([self.cache.keys, *tree_k, k], dim=2)
        values = torch.cat([self.cache.values, *tree_v, v], dim=2)
        attn = backbone.midlayer.self_attn
        attended = F.scaled_dot_product_attention(
            q, attn.expand(keys), attn.expand(values), attn_mask=visible[None, None]
        )
        return backbone.midlayer.finish(features, attended)[0], k, v

    def _select(self, tokens: list[int], parents: list[int], scores: list[float], depths: list[int]) -> Draft:
        """The ``tree_nodes`` most confident nodes (parents first on ties), in topological order."""
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))
        chosen: set[int] = set()
        for node in order:
            if len(chosen) == self.config.tree_nodes:
                break
            if parents[node] < 0 or parents[node] in chosen:
                chosen.add(node)
        kept = sorted(chosen, key=lambda i: (depths[i], i))
        index = {node: i for i, node in enumerate(kept)}
        return Draft(
            tokens=torch.tensor([tokens[n] for n in kept], dtype=torch.long),
            parents=torch.tensor([index[parents[n]] if parents[n] >= 0 else -1 for n in kept], dtype=torch.long),
        )
