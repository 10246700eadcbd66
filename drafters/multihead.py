"""What the multi-head drafters (Medusa, Amphista) share: their config fields, the Medusa head, the weights
they borrow from the frozen target, their training loss, and `MultiHeadDrafter`, the base that binds,
trains and proposes for both. A kind only says what each head reads: `head_inputs` in training,
`root_head_inputs` while decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig, LossOutput, TargetNeeds
from draftsmith.drafters.draft_vocab import DraftVocab, check_size, full_ids, install, keep_inside
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.rank_trees import TreeMixin, tree_draft


@dataclass
class MultiHeadConfig(DrafterConfig):
    """Fields every multi-head drafter (Medusa, Amphista) shares: its heads, their vocabulary projection, the
    per-position loss weights and the candidate tree. Kinds add their own fields and checks.
    ``loss_type`` = "ce": cross-entropy on the target-written tokens; "kl": KL(target || head) to the target's
    distribution (the features must carry its logits). ``draft_vocab`` = N: the heads project onto the N most
    frequent target-written tokens (`drafters.draft_vocab`); None = the whole vocabulary."""

    num_heads: int = 4
    share_lm_head: bool = True
    loss_type: str = "ce"
    loss_decay: float = 0.8
    tree: list[list[int]] | None = None
    tree_nodes: int = 63
    tree_topk: int = 10
    rank_acc: list[list[float]] | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    draft_vocab: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in ("ce", "kl"):
            raise DraftsmithError(f"{self.kind} loss_type must be 'ce' or 'kl', got {self.loss_type!r}")
        check_size(self.kind, self.draft_vocab, candidates=self.tree_topk)
        if self.tree is not None:
            self.tree = [[int(r) for r in path] for path in self.tree]
        if self.rank_acc is not None:
            self.rank_acc = [[float(v) for v in row] for row in self.rank_acc]

    def target_needs(self) -> TargetNeeds:
        """The target's last hidden state, and its logits for the KL loss."""
        return TargetNeeds(hidden_layers=(-1,), logits=self.loss_type == "kl")

    def adopt_target_sizes(self, vocab: int, hidden: int) -> None:
        """Take the target's sizes; a drafter saved for other sizes belongs to another target."""
        for name, have in (("hidden_size", hidden), ("vocab_size", vocab)):
            wanted = getattr(self, name)
            if wanted is not None and wanted != have:
                raise DraftsmithError(f"this drafter has {name}={wanted} but the target has {have}: use its own target")
            setattr(self, name, have)
        check_size(self.kind, self.draft_vocab, vocab)

    @property
    def projection_rows(self) -> int:
        """Rows of each head's vocabulary projection: the draft vocabulary's, else the target's (0 = not known yet)."""
        return self.draft_vocab or self.vocab_size or 0


class ResidualBlock(nn.Module):
    """``x + SiLU(W x + b)``. W and b start at zero, so a fresh block is exactly the identity (Medusa's
    head block; the reference code zeroes W only, the bias too here so the identity is exact)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class Borrowed:
    """Frozen tensors borrowed from the target (LM head, input embeddings).

    A plain object, not a module: what it holds never enters ``state_dict``, ``parameters()`` or the
    optimizer. It keeps the target's *modules* and reads their tensors at each use, so it follows the target
    when a trainer moves it to another device. `get` returns the tensor on the device and in the dtype the
    drafter runs in: the target's own tensor when they match, else a copy made once and reused.
    """

    def __init__(self) -> None:
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._converted: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._owners

    def __deepcopy__(self, memo: dict[int, Any]) -> Borrowed:
        """A copied drafter borrows from the same target; copying the target would defeat borrowing."""
        twin = Borrowed()
        twin._owners = dict(self._owners)
        return twin

    def set(self, name: str, owner: nn.Module, attribute: str = "weight") -> None:
        self._owners[name] = (owner, attribute)

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._owners:
            raise DraftsmithError(f"the drafter has no {name} yet: call drafter.bind(target_model) first")
        owner, attribute = self._owners[name]
        source = getattr(owner, attribute).detach()
        if source.device == torch.device(device) and source.dtype == dtype:
            return source
        key = (name, torch.device(device), dtype)
        cached = self._converted.get(key)
        if cached is None or cached[0].data_ptr() != source.data_ptr() or cached[0].device != source.device:
            # A copy made under the evaluator's inference_mode could not be used by training later on.
            with torch.inference_mode(False):
                self._converted[key] = (source, source.to(device=device, dtype=dtype))
        return self._converted[key][1]


def borrow_lm_head(borrowed: Borrowed, target: nn.Module) -> torch.Tensor:
    """Put the target's output projection (and its bias, if any) into ``borrowed``; return the weight."""
    head = target.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise DraftsmithError(f"{type(target).__name__} has no output embeddings (LM head) to share with a drafter")
    borrowed.set("lm_head", head)
    if getattr(head, "bias", None) is not None:
        borrowed.set("lm_head_bias", head, "bias")
    return head.weight


class VocabHeads(nn.Module):
    """K Medusa heads: ``num_layers`` ResidualBlocks each, then a vocabulary projection.

    The projection is the target's LM head (borrowed, frozen; ``share_lm_head=True``) or a trainable
    copy per head, initialised from the target's head by `init_copies` the first time the drafter is
    bound. A bias of the target's head, if it has one, is always the target's own (borrowed).
    """

    def __init__(self, num_heads: int, dim: int, num_layers: int, vocab_size: int, share_lm_head: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(dim) for _ in range(num_layers))) for _ in range(num_heads)
        )
        self.share_lm_head = share_lm_head
        if not share_lm_head:
            self.projections = nn.Parameter(torch.zeros(num_heads, vocab_size, dim))
            # Saved with the weights, so binding a trained drafter to its target never overwrites its copies.
            self.register_buffer("copies_initialised", torch.tensor(False))

    def init_copies(self, lm_head_weight: torch.Tensor) -> None:
        if self.share_lm_head or bool(self.copies_initialised):
            return
        if lm_head_weight.shape != self.projections.shape[1:]:
            raise DraftsmithError(
                f"the drafter's own vocab projections are {tuple(self.projections.shape[1:])} but the target's "
                f"LM head is {tuple(lm_head_weight.shape)}: this drafter was made for another target"
            )
        with torch.no_grad():
            self.projections.copy_(lm_head_weight.to(self.projections)[None].expand_as(self.projections))
            self.copies_initialised.fill_(True)

    def _weight(self, head: int | None, lm_head: torch.Tensor) -> torch.Tensor:
        if self.share_lm_head:
            return lm_head
        return self.projections if head is None else self.projections[head]

    def head_logits(
        self, head: int, x: torch.Tensor, lm_head: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[..., V]`` of head ``head`` (0-based) for features ``x [..., dim]``."""
        return F.linear(self.blocks[head](x), self._weight(head, lm_head), bias)

    def all_logits(self, x: torch.Tensor, lm_head: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[K, V]`` of every head, head k reading row k of ``x [K, dim]``."""
        features = torch.stack([block(row) for block, row in zip(self.blocks, x)])
        if self.share_lm_head:
            return F.linear(features, lm_head, bias)
        logits = torch.einsum("kd,kvd->kv", features, self.projections)
        return logits if bias is None else logits + bias


class MultiHeadDrafter(TreeMixin, Drafter):
    """K heads over per-position features; head k (1-based) at position t guesses token t+k+1. Candidates:
    each head's top-``tree_topk`` at the root's position, hung in the rank-path tree of `rank_trees`. With
    ``draft_vocab`` the heads project onto the rows of the map (``vocab_map``) and propose through it."""

    config: MultiHeadConfig

    def __init__(self, config: MultiHeadConfig) -> None:
        super().__init__(config)
        self.borrowed = Borrowed()
        self.vocab_map = DraftVocab(config.draft_vocab) if config.draft_vocab else None
        self.built = False
        if config.hidden_size is not None and (config.share_lm_head or config.vocab_size is not None):
            self._build()
        self.draft_tree()

    def _build(self) -> None:
        """Create the modules, ``self.heads`` among them, once the sizes are known; set ``self.built``."""
        raise NotImplementedError

    def borrow(self, target: nn.Module) -> None:  # noqa: B027 - optional hook
        """Borrow what this kind needs of the target besides its LM head (e.g. its input embeddings)."""

    def head_inputs(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every head's input ``[B, T', K, H]`` per position (T' <= T) from the target's last hidden state."""
        raise NotImplementedError

    def root_head_inputs(self, state: DecodeState) -> torch.Tensor:
        """Every head's input ``[K, H]`` at the position that produced the root token."""
        raise NotImplementedError

    def target_needs(self) -> TargetNeeds:
        return self.config.target_needs()

    def bind(self, target: nn.Module) -> None:
        weight = borrow_lm_head(self.borrowed, target)
        self.borrow(target)
        vocab, hidden = weight.shape
        self.config.adopt_target_sizes(vocab, hidden)
        if not self.built:
            self._build()
            self.to(weight.device)
        self._init_copies(weight)

    def _init_copies(self, weight: torch.Tensor) -> None:
        """Heads with their own projections start from the target's LM head (its rows of the map, once built)."""
        if self.vocab_map is None:
            self.heads.init_copies(weight)
        elif self.vocab_map.ready:
            self.heads.init_copies(self.vocab_map.rows(weight))

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Install the draft vocabulary training built (`drafters.draft_vocab.most_frequent`)."""
        install(self.vocab_map, self.config.kind, ids)
        if self.built and not self.config.share_lm_head:  # bound before the map existed: copies start now
            projections = self.heads.projections
            self._init_copies(self.borrowed.get("lm_head", projections.device, projections.dtype))

    def _lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The projection the heads share (the LM head, or its rows of the map) and the target's bias, if any."""
        param = next(self.parameters(), None) if self.built else None
        if param is None:
            raise DraftsmithError(
                f"the {self.config.kind} drafter is not built yet: call drafter.bind(target_model) first"
            )
        bias = self.borrowed.get("lm_head_bias", param.device, param.dtype) if "lm_head_bias" in self.borrowed else None
        weight = self.borrowed.get("lm_head", param.device, param.dtype)
        if self.vocab_map is None:
            return weight, bias
        # heads with projections of their own (share_lm_head=False) already have the map's rows
        rows = self.vocab_map.rows(weight) if self.config.share_lm_head else weight
        return rows, None if bias is None else self.vocab_map.rows(bias)

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> LossOutput:
        lm_head, bias = self._lm_head()
        hidden, target_logits = check_batch(batch, features, self.config)
        inputs = self.head_inputs(hidden.to(lm_head.dtype), batch)

        def head_logits(k: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.heads.head_logits(k - 1, inputs[rows, positions, k - 1], lm_head, bias)

        c = self.config
        return multi_head_loss(
            head_logits, batch, c.num_heads, c.loss_decay, c.tree_topk, target_logits, self.vocab_map
        )

    @torch.no_grad()
    def draft_logits(self, state: DecodeState) -> torch.Tensor:
        """Every head's logits ``[K, V]`` at the position that produced the root token (V = the draft
        vocabulary's size with ``draft_vocab``: column j is draft id j)."""
        lm_head, bias = self._lm_head()
        return self.heads.all_logits(self.root_head_inputs(state).to(lm_head.dtype), lm_head, bias)

    def propose(self, state: DecodeState) -> Draft:
        if state.hidden[-1].shape[0] == 0:
            return Draft.empty()
        tree = self.draft_tree()
        topk_tokens = full_ids(self.vocab_map, self.draft_logits(state).topk(tree.max_rank + 1, dim=-1).indices)
        return tree_draft(tree, topk_tokens.cpu())  # the engine keeps its token buffer on the CPU


def check_batch(
    batch: dict[str, torch.Tensor], features: dict[str, Any], config: MultiHeadConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last hidden state ``[B, T, H]`` and, for ``loss_type`` "kl", the target's logits ``[B, T, V]`` (else
    None), after checking that batch and features fit the loss contract."""
    missing = [key for key in ("input_ids", "attention_mask", "loss_mask") if key not in batch]
    if missing:
        raise DraftsmithError(f"the training batch lacks {', '.join(missing)}: the data collator must provide them")
    hidden = features.get("hidden", {}).get(-1)
    if hidden is None:
        raise DraftsmithError("features lack hidden[-1] (the target's last hidden state): compute it for this drafter")
    shape = tuple(batch["input_ids"].shape)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape:
        raise DraftsmithError(f"hidden[-1] is {tuple(hidden.shape)} but input_ids is {shape}: they must align")
    if not config.target_needs().logits:
        return hidden, None
    if "logits" not in features:
        raise DraftsmithError("loss_type=kl needs the target's logits in the features: enable them or use loss_type=ce")
    return hidden, features["logits"]


def rank_hits(logits: torch.Tensor, labels: torch.Tensor, topk: int) -> torch.Tensor:
    """``[topk]``: how many ``labels`` are the rank-r candidate of ``logits [N, V]`` (zero past the vocabulary)."""
    ranks = min(topk, logits.shape[-1])
    hit = (logits.detach().topk(ranks, dim=-1).indices == labels[:, None]).sum(0).float()
    return F.pad(hit, (0, topk - ranks))


def multi_head_loss(
    head_logits: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: dict[str, torch.Tensor],
    num_heads: int,
    decay: float,
    topk: int,
    target_logits: torch.Tensor | None = None,
    vocab: DraftVocab | None = None,
) -> LossOutput:
    """``sum_k decay**(k-1) * L_k`` where L_k is head k's mean loss over its counted positions: the loss of every
    drafter whose k-th draft position at hidden-state position t guesses token t+k+1 (Medusa's and Amphista's
    heads, EAGLE-3's test steps, ParallelSpec's mask tokens).

    Head k (1-based) at position t predicts token t+k+1. Position t counts for head k when that label
    token is target-written (``loss_mask``) and both t and the label lie inside ``attention_mask``.
    ``head_logits(k, b, t)`` gives head k's logits ``[N, V]`` at batch rows b and positions t.
    L_k is cross-entropy on the label tokens, or, with ``target_logits [B, T, V]``, KL(target || head)
    where the target's distribution for token t+k+1 comes from its logits at position t+k.
    The `LossOutput` counts, per head, the labels found at each of the top-``topk`` ranks.
    With a draft ``vocab``, ``head_logits`` are over its ids: a label outside it is left out of the loss
    (`keep_inside`), KL compares with the target's distribution renormalised over it, and it still counts as a
    position no rank hit (the drafter can never propose it), so accuracies and tau_est stay those of decoding.
    """
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"].bool()
    inside = batch["attention_mask"].bool()
    seq_len = input_ids.shape[1]
    terms, hits, counts = [], [], []
    for k in range(1, num_heads + 1):
        offset = k + 1
        span = max(seq_len - offset, 0)
        counted = inside[:, :span] & inside[:, offset:] & loss_mask[:, offset:]
        rows, positions = counted.nonzero(as_tuple=True)
        labels = input_ids[rows, positions + offset]
        positions_counted = labels.new_tensor(labels.numel(), dtype=torch.float)
        if vocab is not None:
            rows, positions, labels = keep_inside(vocab, rows, positions, labels)
        logits = head_logits(k, rows, positions).float()
        if labels.numel() == 0:
            term = logits.sum() * 0.0  # keeps the graph: a batch without counted positions still backpropagates
        elif target_logits is None:
            term = F.cross_entropy(logits, labels)
        else:
            reference = target_logits[rows, positions + k].detach()
            reference = F.log_softmax(reference.float(), dim=-1) if vocab is None else vocab.restrict(reference)
            term = F.kl_div(F.log_softmax(logits, dim=-1), reference, log_target=True, reduction="batchmean")
        terms.append(decay ** (k - 1) * term)
        hits.append(rank_hits(logits, labels, topk))
        counts.append(positions_counted)
    return LossOutput(loss=torch.stack(terms).sum(), hits=torch.stack(hits), counts=torch.stack(counts))
