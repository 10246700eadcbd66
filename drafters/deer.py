"""DEER (Cheng et al. 2025): a masked-diffusion drafter that drafts a whole block in ONE denoising step.

The drafter is a small masked-diffusion LM with the target's tokenizer. Without a pretrained one
(``diffusion_lm`` = None) it is built from the target: its embeddings, its first ``num_layers`` decoder layers,
its final norm and its LM head, copied (by ``init_from: target``) and trained; the target stays frozen. With
``diffusion_lm`` (a Hub id or folder of a transformers causal-LM checkpoint trained as a masked-diffusion LM, such
as Open-dCoder) the architecture is that model's and ``init_from`` set to the same id loads its weights. Either
way the embeddings and the LM head are untied copies, and the architecture is saved in ``architecture``, so an
export loads without the Hub.

One proposal. The verified sequence is x_0 .. x_p, x_p the root. Rows: the prefix x_0 .. x_{p-1}, causal, then
the block [x_p, M x k, SEP] at positions p .. p+k+1: the root, k mask slots for x_{p+1} .. x_{p+k} and the
separator that says the text is cut there. Block rows see the prefix and each other (bidirectional); prefix rows
see only the prefix up to themselves. With ``shift`` (DiffuGPT's and Dream's choice, kept so the LM head stays a
next-token head) a row's output predicts the token one position further: slot j is read at block row j - 1.
Greedy drafts the per-position argmax as a chain; sampling draws each position from its own warped distribution
(the positions are drawn independently, so each carries exactly the q it was drawn from: lossless).

The KV cache. The drafter's cache holds the prefix rows x_0 .. x_{p-1}, what the target's cache holds. A prefix
row depends on x_0 .. x_i alone, so its keys and values stay exact as long as those tokens do. Each proposal
keeps the longest cached prefix that equals the verified tokens (rollback: anything past it is cut), computes
the verified tokens not cached yet as causal rows and the block in one forward, then cuts the block's keys off
again. Draft tokens never enter the cache, so a rejection leaves nothing to undo.

Training, one forward per batch: after the causal prefix rows of a sequence come ``cuts`` groups, one per random
cut c inside the target-written tokens, laid out as a block with the root x_{c-1}; each group sees the prefix
rows before c - 1 and itself, exactly what decoding sees. ``stage`` picks the objective (each a recipe phase):
- "adapt" (stage 0, for a drafter built from an AR model): block length m ~ U(1, block_size), each slot masked
  with probability t ~ U(mask_rate_min, 1) per group, cross-entropy on masked slots weighted 1 / t; inside the
  block the causal mask is annealed away: each later slot is visible with probability min(1, n / anneal_steps)
  after n training batches of this stage (a saved buffer, so a resumed run continues the schedule).
- "continue" (stage I, continuation distillation): the same with full block attention.
- "scribe" (stage II): R ~ U(1, scribe_max) slots, all masked, slot i weighted scribe_alpha ** (R - i), so the
  slots nearest the prefix count most.
The loss is the weighted cross-entropy summed over masked slots, divided by the number of target-written slots.

Fields (default):
- ``num_layers`` = 4, ``diffusion_lm`` = None, ``shift`` = True (see above).
- ``block_size`` = 16: the longest block trained in stages 0 and I; ``draft_len`` = None: tokens drafted per
  proposal (None = block_size).
- ``stage`` = "continue", ``cuts`` = 4 groups per sequence, ``mask_rate_min`` = 1.0 (every slot masked, as the one
  decoding step sees it; stage 0 recipes lower it), ``anneal_steps`` = 1000, ``scribe_max`` = 96 and
  ``scribe_alpha`` = 1.01 (the paper's), ``topk`` = 4 (ranks at which hits are counted).
- ``mask_token_id`` / ``separator_token_id`` = None: the mask and separator are learned vectors, started from
  these tokens' embeddings; None = the mean embedding for the mask (a pretrained diffusion LM's tokenizer's mask
  token when it has one), the end-of-sequence token's for the separator.
- DiffuSpec (`drafters.diffuspec`), both off: ``path_search`` (``lattice_mass`` = 0.8, ``lattice_width`` = 15,
  ``beam_width`` = 3, ``path_weight`` = 0.5, an n-gram proxy of ``ngram_order`` = 3 with ``ngram_prior`` = 1.0);
  ``adaptive_length`` (``length_min`` = 4 up to draft_len, ``length_step`` = 4, ``length_ema`` = 0.5). Path search
  picks tokens deterministically, so sampled decoding then verifies them as deterministic candidates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig, LossOutput, register
from draftsmith.drafters.diffuspec import LengthController, NgramProxy, lattice, path_search
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.feedback import ChainFeedback
from draftsmith.drafters.multihead import rank_hits
from draftsmith.drafters.sampling import warp

if TYPE_CHECKING:
    from draftsmith.drafters.target import Target

STAGES = ("adapt", "continue", "scribe")
TOKEN, MASK, SEPARATOR = 0, 1, 2  # what a block row holds
# config keys of a transformers model that describe the saved file, not the architecture
VOLATILE_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")


@dataclass
class DeerConfig(DrafterConfig):
    kind: ClassVar[str] = "deer"

    num_layers: int = 4
    diffusion_lm: str | None = None
    shift: bool = True
    block_size: int = 16
    draft_len: int | None = None
    stage: str = "continue"
    cuts: int = 4
    mask_rate_min: float = 1.0
    anneal_steps: int = 1000
    scribe_max: int = 96
    scribe_alpha: float = 1.01
    topk: int = 4
    mask_token_id: int | None = None
    separator_token_id: int | None = None
    path_search: bool = False
    lattice_mass: float = 0.8
    lattice_width: int = 15
    beam_width: int = 3
    path_weight: float = 0.5
    ngram_order: int = 3
    ngram_prior: float = 1.0
    adaptive_length: bool = False
    length_min: int = 4
    length_step: int = 4
    length_ema: float = 0.5
    architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise DraftsmithError(f"deer stage={self.stage!r}: use one of {', '.join(STAGES)}")
        counts = ("num_layers", "block_size", "cuts", "scribe_max", "topk", "lattice_width", "beam_width")
        for name in (*counts, "ngram_order", "length_min"):
            if int(getattr(self, name)) < 1:
                raise DraftsmithError(f"deer {name}={getattr(self, name)}: must be at least 1")
        if self.draft_len is not None and self.draft_len < 1:
            raise DraftsmithError(f"deer draft_len={self.draft_len}: must be at least 1 (or null = block_size)")
        if not 0.0 < self.mask_rate_min <= 1.0:
            raise DraftsmithError(f"deer mask_rate_min={self.mask_rate_min}: must lie in (0, 1]")
        for name in ("lattice_mass", "path_weight", "length_ema"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DraftsmithError(f"deer {name}={getattr(self, name)}: must lie in [0, 1]")
        if self.scribe_alpha <= 0 or self.anneal_steps < 0 or self.length_step < 0 or self.ngram_prior <= 0:
            raise DraftsmithError("deer needs scribe_alpha > 0, ngram_prior > 0, anneal_steps >= 0, length_step >= 0")

    @property
    def drafted(self) -> int:
        return self.draft_len or self.block_size


@dataclass
class Groups:
    """The training blocks of a batch (B rows, G groups each, ``span`` slots): ``cuts [B, G]`` (the root is token
    cut - 1; 0 = no group), ``lengths [B, G]`` (slots used), ``masked [B, G, span]``, ``weights [B, G, span]`` (the
    loss weight of a masked slot) and, in stage 0, ``reveal [B, G, span + 2, span + 2]`` (later block rows a row
    may see)."""

    cuts: torch.Tensor
    lengths: torch.Tensor
    masked: torch.Tensor
    weights: torch.Tensor
    reveal: torch.Tensor | None = None

    @property
    def span(self) -> int:
        return self.masked.shape[-1]


def fetch_model(source: str) -> Path:
    """A local folder as is, else the Hub repo ``source`` downloaded; offline or unknown: one line saying what to do."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, unknown or gated repo: the same advice
        raise DraftsmithError(
            f"drafter.diffusion_lm={source!r}: could not get that Hub repo ({type(err).__name__}). Download it where "
            f"the Hub is reachable (`hf download {source}`), then pass its local folder as drafter.diffusion_lm"
        ) from None


def _mask_token(folder: Path) -> int | None:
    """The mask token of a diffusion LM's tokenizer; None when it ships no tokenizer or its tokenizer has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder).mask_token_id
    except (OSError, ValueError):  # no tokenizer files in the folder
        return None


def _eos_ids(model: nn.Module) -> set[int]:
    found = set()
    for config in (getattr(model, "generation_config", None), model.config):
        value = getattr(config, "eos_token_id", None)
        found |= {value} if isinstance(value, int) else set(value or ())
    return found


@register
class DeerDrafter(Drafter):
    config_class = DeerConfig
    config: DeerConfig

    def __init__(self, config: DeerConfig | None = None) -> None:
        super().__init__(config or DeerConfig())
        self.lm: nn.Module | None = None
        self.register_buffer("adapt_batches", torch.tensor(0))
        self.eos_ids: set[int] = set()
        if self.config.architecture is not None:
            self._build()
        self.reset()

    @classmethod
    def for_target(cls, target: Target) -> DeerDrafter:
        """``drafter=deer`` untrained: the target's first layers copied, the baseline a trained DEER starts from."""
        drafter = cls(DeerConfig(init_from="target"))
        drafter.bind(target.model)
        drafter.init_weights("target", target.model)
        return drafter

    # -- building ------------------------------------------------------------------------------

    def _build(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        values = dict(self.config.architecture)
        hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
        self.lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
        hidden = hf_config.hidden_size
        self.mask_embed = nn.Parameter(torch.zeros(hidden))
        self.separator_embed = nn.Parameter(torch.zeros(hidden))

    def _architecture(self, target: nn.Module) -> dict[str, Any]:
        """The drafter's transformers config: the pretrained diffusion LM's, or the target's cut to num_layers."""
        from transformers import AutoConfig

        c = self.config
        if c.diffusion_lm:
            folder = fetch_model(c.diffusion_lm)
            hf_config = AutoConfig.from_pretrained(folder)
            if c.mask_token_id is None:
                c.mask_token_id = _mask_token(folder)
        else:
            hf_config = type(target.config).from_dict(target.config.to_dict())
            layers = hf_config.num_hidden_layers
            if c.num_layers > layers:
                raise DraftsmithError(f"deer num_layers={c.num_layers}, but the target has only {layers} layers")
            hf_config.num_hidden_layers = c.num_layers
            if getattr(hf_config, "layer_types", None):
                hf_config.layer_types = hf_config.layer_types[: c.num_layers]
        hf_config.tie_word_embeddings = False  # the export saves each tensor once; tied ones would share memory
        values = hf_config.to_dict()
        return {k: v for k, v in values.items() if k not in VOLATILE_KEYS}

    def bind(self, target: nn.Module) -> None:
        if self.lm is None:
            self.config.architecture = self._architecture(target)
            self._build()
            self.to(target.get_input_embeddings().weight.device)
        head = target.get_output_embeddings()
        have, want = self.lm.config.vocab_size, head.weight.shape[0]
        if have != want:
            raise DraftsmithError(
                f"the deer drafter's vocabulary has {have} tokens, the target's {want}: use its target"
            )
        self.eos_ids = _eos_ids(target)

    def _built(self) -> nn.Module:
        if self.lm is None:
            raise DraftsmithError("the deer drafter is not built yet: call drafter.bind(target_model) first")
        return self.lm

    def init_weights(self, source: str, target: nn.Module) -> None:
        """``"target"``: copy the target's embeddings, first layers, norm and LM head; ``diffusion_lm``: load that
        model's weights; anything else: an export (`Drafter.init_weights`)."""
        from transformers import AutoModelForCausalLM

        c = self.config
        if source == "target":
            if c.diffusion_lm:
                raise DraftsmithError(
                    f"drafter.init_from=target, but drafter.diffusion_lm={c.diffusion_lm} sets another architecture: "
                    "set init_from to the diffusion LM, or diffusion_lm=null"
                )
            self._copy(target.state_dict(), "the target")
        elif source == c.diffusion_lm:
            pretrained = AutoModelForCausalLM.from_pretrained(fetch_model(source), dtype=torch.float32)
            self._copy(pretrained.state_dict(), source)
        else:
            super().init_weights(source, target)
            return
        embeddings = self.lm.get_input_embeddings().weight
        separator = c.separator_token_id if c.separator_token_id is not None else min(_eos_ids(target), default=None)
        with torch.no_grad():
            mask = embeddings.mean(0) if c.mask_token_id is None else embeddings[c.mask_token_id]
            self.mask_embed.copy_(mask)
            self.separator_embed.copy_(embeddings.mean(0) if separator is None else embeddings[separator])

    def _copy(self, state: dict[str, torch.Tensor], name: str) -> None:
        own = self._built().state_dict()
        wrong = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
        if wrong:
            raise DraftsmithError(f"{name} has no weight {wrong[0]} of the drafter's shape: the architectures differ")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key].to(value))

    # -- the shared forward ----------------------------------------------------------------------

    def embed_rows(self, ids: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Input vectors for rows holding a token, the mask or the separator (``kinds``)."""
        tokens = self._built().get_input_embeddings()(ids.clamp(min=0).to(self.mask_embed.device))
        kinds = kinds.to(tokens.device)[..., None]
        special = torch.where(kinds == MASK, self.mask_embed, self.separator_embed)
        return torch.where(kinds == TOKEN, tokens, special.to(tokens.dtype))

    def hidden(
        self, embeds: torch.Tensor, visible: torch.Tensor, positions: torch.Tensor, cache: Any = None
    ) -> torch.Tensor:
        """Last hidden states ``[B, R, H]`` of rows ``embeds [B, R, H]`` at ``positions``; ``visible [B, R, C + R]``
        says which cached and new rows each row attends to (its own row always included)."""
        # the cache under the keyword the whole pinned transformers range knows (the engine's too)
        kept = {"use_cache": False} if cache is None else {"past_key_values": cache, "use_cache": True}
        out = self._built().model(
            inputs_embeds=embeds,
            attention_mask=visible[:, None].to(embeds.device),
            position_ids=positions.to(embeds.device),
            **kept,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._built().get_output_embeddings()(hidden)

    # -- training ------------------------------------------------------------------------------

    def sample_groups(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> Groups:
        """Random cuts, block lengths, masks and weights for ``stage`` (see the module docstring)."""
        c = self.config
        inside, written = batch["attention_mask"].bool().cpu(), batch["loss_mask"].bool().cpu()
        rows, length = inside.shape
        span = c.scribe_max if c.stage == "scribe" else c.block_size
        cuts = torch.zeros(rows, c.cuts, dtype=torch.long)
        lengths = torch.zeros(rows, c.cuts, dtype=torch.long)
        rate = torch.ones(rows, c.cuts)
        if c.stage != "scribe" and c.mask_rate_min < 1.0:
            rate = c.mask_rate_min + (1.0 - c.mask_rate_min) * torch.rand(rows, c.cuts, generator=generator)
        for row in range(rows):
            valid = (written[row] & inside[row]).nonzero().flatten()
            valid = valid[valid >= 1]
            chosen = valid[torch.randperm(valid.numel(), generator=generator)[: c.cuts]]
            room = int(inside[row].sum()) - chosen
            drawn = torch.randint(1, span + 1, (chosen.numel(),), generator=generator)
            cuts[row, : chosen.numel()], lengths[row, : chosen.numel()] = chosen, torch.minimum(drawn, room)
        slot = torch.arange(1, span + 1)
        used = slot <= lengths[..., None]
        masked = used & (torch.rand(rows, c.cuts, span, generator=generator) < rate[..., None])
        if c.stage == "scribe":
            weights = c.scribe_alpha ** (lengths[..., None] - slot).clamp(min=0).double()
        else:
            weights = (1.0 / rate)[..., None].double().expand(-1, -1, span)
        reveal = None
        if c.stage == "adapt":
            progress = 1.0 if c.anneal_steps == 0 else min(1.0, int(self.adapt_batches) / c.anneal_steps)
            reveal = torch.rand(rows, c.cuts, span + 2, span + 2, generator=generator) < progress
        return Groups(cuts, lengths, masked, weights.float() * masked, reveal)

    def group_layout(
        self, input_ids: torch.Tensor, inside: torch.Tensor, groups: Groups
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of one training forward: ``embeds [B, T + G * S]``, ``visible`` and ``positions``, with the prefix
        rows first and group g's S = span + 2 rows (root, slots, separator, unused) after them."""
        rows, length = input_ids.shape
        count, size = groups.cuts.shape[1], groups.span + 2
        ids, inside = input_ids.cpu(), inside.bool().cpu()
        block = torch.arange(size)
        active = (block <= groups.lengths[..., None] + 1) & (groups.cuts[..., None] > 0)  # [B, G, S]
        sources = (groups.cuts[..., None] - 1 + block).clamp(0, length - 1)
        block_ids = torch.gather(ids, 1, sources.flatten(1)).view(rows, count, size)
        kinds = torch.full((rows, count, size), MASK)
        kinds[..., 0] = TOKEN
        kinds[..., 1:-1] = torch.where(groups.masked, MASK, TOKEN)
        kinds = torch.where(block == groups.lengths[..., None] + 1, SEPARATOR, kinds)
        kinds = torch.where(active, kinds, MASK)
        total = length + count * size
        visible = torch.zeros(rows, total, total, dtype=torch.bool)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        visible[:, :length, :length] = causal & inside[:, None, :]
        before = torch.arange(length) < (groups.cuts[..., None] - 1)  # [B, G, T]: prefix rows a group sees
        within = active[..., :, None] & active[..., None, :]
        if groups.reveal is not None:
            within &= (block[None, :] <= block[:, None]) | groups.reveal
        for g in range(count):
            rows_g = slice(length + g * size, length + (g + 1) * size)
            visible[:, rows_g, :length] = (before[:, g] & inside)[:, None, :] & active[:, g, :, None]
            visible[:, rows_g, rows_g] = within[:, g]
        visible |= torch.eye(total, dtype=torch.bool)
        all_kinds = torch.cat([torch.full_like(ids, TOKEN), kinds.flatten(1)], 1)
        embeds = self.embed_rows(torch.cat([ids, block_ids.flatten(1)], 1), all_kinds)
        block_positions = (groups.cuts[..., None] - 1 + block).clamp(min=0).flatten(1)
        positions = torch.cat([torch.arange(length).expand(rows, -1), block_positions], 1)
        return embeds, visible, positions

    def group_loss(self, batch: dict[str, torch.Tensor], groups: Groups) -> LossOutput:
        c = self.config
        ids, inside = batch["input_ids"], batch["attention_mask"].bool()
        written = (batch["loss_mask"].bool() & inside).cpu()
        length, size = ids.shape[1], groups.span + 2
        embeds, visible, positions = self.group_layout(ids, inside, groups)
        hidden = self.hidden(embeds, visible, positions)
        slot = torch.arange(1, groups.span + 1)
        where = (groups.cuts[..., None] - 1 + slot).clamp(max=length - 1)  # the token each slot stands for
        counted = (slot <= groups.lengths[..., None]) & torch.gather(written, 1, where.flatten(1)).view(where.shape)
        scored = counted & groups.masked
        b, g, j = scored.nonzero(as_tuple=True)
        reading = length + g * size + (j + 1) - int(c.shift)  # slot j + 1 is read at block row j + 1 - shift
        labels = ids.cpu()[b, where[b, g, j]].to(hidden.device)
        logits = self.logits(hidden[b.to(hidden.device), reading.to(hidden.device)]).float()
        weights = groups.weights[b, g, j].to(logits.device)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = (weights * ce).sum() / max(int(counted.sum()), 1) if labels.numel() else hidden.sum() * 0.0
        positions = c.drafted
        hits = torch.zeros(positions, c.topk, device=logits.device)
        counts = torch.zeros(positions, device=logits.device)
        for k in range(min(positions, groups.span)):
            chosen = (j == k).to(logits.device)
            hits[k] = rank_hits(logits[chosen], labels[chosen], c.topk)
            counts[k] = chosen.sum()
        if self.training and c.stage == "adapt":
            self.adapt_batches += 1
        return LossOutput(loss=loss, hits=hits, counts=counts)

    def loss(self, batch: dict[str, torch.Tensor], features: dict[str, Any]) -> LossOutput:
        # validation draws the same blocks every epoch, so its figures compare across epochs and stages
        generator = None if self.training else torch.Generator().manual_seed(0)
        return self.group_loss(batch, self.sample_groups(batch, generator))

    # -- decoding ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.cache: Any = None
        self.cached: list[int] = []
        self.feedback = ChainFeedback()
        c = self.config
        self.controller = LengthController(min(c.length_min, c.drafted), c.drafted, c.length_step, c.length_ema)
        self.proxy = NgramProxy(c.ngram_order, self.lm.config.vocab_size if self.lm is not None else 1, c.ngram_prior)

    def max_draft_nodes(self) -> int:
        return self.config.drafted

    def set_draft_size(self, nodes: int) -> None:
        self.config = dataclasses.replace(self.config, draft_len=nodes)
        self.reset()

    def draft_shape(self) -> dict[str, Any]:
        c = self.config
        return {"draft_len": c.drafted, "path_search": c.path_search, "adaptive_length": c.adaptive_length}

    def _keep_cache(self, prefix: list[int]) -> int:
        """Cut the cache to the longest cached prefix equal to ``prefix``; return its length."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self._built().config)
        keep = 0
        for cached, token in zip(self.cached, prefix):
            if cached != token:
                break
            keep += 1
        if self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())
        self.cached = self.cached[:keep]
        return keep

    @torch.no_grad()
    def block_logits(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Logits ``[k, V]`` of the k slots after the root ``tokens[-1]``, in one forward (see the module docstring)."""
        prefix = tokens[:-1].tolist()
        keep = self._keep_cache(prefix)
        new = torch.as_tensor(prefix[keep:], dtype=torch.long)
        n, size = new.numel(), k + 2
        rows = n + size
        kinds = torch.tensor([TOKEN] * (n + 1) + [MASK] * k + [SEPARATOR])
        ids = torch.cat([new, tokens[-1:].cpu(), torch.zeros(k + 1, dtype=torch.long)])
        visible = torch.ones(rows, keep + rows, dtype=torch.bool)
        visible[:n, keep:] = torch.ones(n, rows, dtype=torch.bool).tril()
        positions = torch.arange(keep, keep + rows)
        hidden = self.hidden(self.embed_rows(ids, kinds)[None], visible[None], positions[None], self.cache)[0]
        self.cache.crop(-size)
        self.cached = prefix
        reading = n + torch.arange(1, k + 1) - int(self.config.shift)
        return self.logits(hidden[reading.to(hidden.device)]).float()

    def propose(self, state: DecodeState) -> Draft:
        c = self.config
        accepted = self.feedback.accepted(state.tokens)
        if c.adaptive_length and accepted is not None:
            self.controller.update(len(self.feedback.draft), accepted)
        k = self.controller.length if c.adaptive_length else c.drafted
        logits = self.block_logits(state.tokens, k)
        probs = None
        if c.path_search:
            context = state.tokens.tolist()
            self.proxy.update(context)
            q = torch.softmax(logits, -1) if state.greedy else warp(logits, state.sampling)
            positions = lattice(q, c.lattice_mass, c.lattice_width, self.eos_ids)
            tokens = path_search(positions, self.proxy, context, c.beam_width, c.path_weight, self.eos_ids)
        elif state.greedy:
            tokens = logits.argmax(-1).tolist()
        else:
            probs = warp(logits, state.sampling)
            tokens = torch.multinomial(probs, 1, generator=state.generator).flatten().tolist()
        self.feedback.remember(tokens, state.tokens)
        return Draft.chain(tokens, probs=probs)
