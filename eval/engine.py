"""The speculative decoding engine: one target, a rollback KV cache, tree verification in one forward."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.utils.import_utils import is_torch_greater_or_equal

from draftsmith.drafters import trees as tree
from draftsmith.drafters.base import DecodeState, Draft, Drafter, UsesDecoder
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.sampling import SamplingConfig, warp
from draftsmith.eval import acceptance
from draftsmith.eval.kvcache import RollbackCache


@dataclass(frozen=True)
class StepRecord:
    """One verification forward: ``appended`` tokens joined the output (accepted + bonus, after cutting
    at eos / max_new_tokens), ``accepted`` draft tokens passed, ``offered`` draft tokens could have.
    ``rows``: rows verified (the root + draft nodes); ``draft_s``: the drafter's time (0 when it was not asked);
    ``verify_s``: everything else of the step (layout, target forward, acceptance, cache compaction)."""

    appended: int
    accepted: int
    offered: int
    rows: int = 1
    draft_s: float = 0.0
    verify_s: float = 0.0


class DraftPlanner(Protocol):
    """Chooses each step's draft size (``tree_nodes=auto``, `eval.cost_model.DraftShaper`)."""

    def plan(self, capacity: int) -> int:
        """The most draft nodes to verify next, in a cache of ``capacity`` slots (every verification attends over
        all of them); 0 = a plain step, for which the drafter is not asked."""
        ...

    def observe(self, verdict: acceptance.Verdict, record: StepRecord) -> None:
        """What the step just verified gave and cost."""
        ...


@dataclass
class Generation:
    """One generated answer. The prefill forward is not a step: ``steps`` are verification forwards."""

    tokens: list[int]
    steps: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0
    target_s: float = 0.0
    drafter_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """Time spent neither in target forwards nor in the drafter: the engine's own bookkeeping."""
        return max(self.wall_s - self.target_s - self.drafter_s, 0.0)


GROUPED_SDPA = "draftsmith_grouped_sdpa"
SDPA_HAS_GROUPS = is_torch_greater_or_equal("2.5")  # enable_gqa


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for a masked query of several rows, with grouped-query heads left to the
    kernel (``enable_gqa``). transformers copies every key and value of the whole cache once per head group
    there (``repeat_kv``), which on a CPU made a tree verification cost well above a bare forward of as many
    tokens; the output is the same."""
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)


def eos_token_ids(model: PreTrainedModel, tokenizer: object | None = None) -> set[int]:
    """End-of-sequence and end-of-turn ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, list | tuple) else [value])
    return ids


class SpeculativeDecoder:
    """Decodes one sequence at a time with any drafter (the ``ar`` drafter = plain decoding).

    The KV cache is allocated once with room for the longest sequence seen and only grows when a longer
    prompt arrives; between sequences and after rejections it is rolled back by length.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_ids: set[int] | None = None,
        sampling: SamplingConfig | None = None,
        max_draft_nodes: int = 64,
    ) -> None:
        self.model = model
        self.eos_ids = set(eos_ids) if eos_ids is not None else eos_token_ids(model)
        self.sampling = sampling or SamplingConfig()
        self.max_draft_nodes = max_draft_nodes
        self.cache: RollbackCache | None = None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.target_s = 0.0
        self._hidden: dict[int, torch.Tensor] = {}

    def _ensure_capacity(self, needed: int) -> RollbackCache:
        if self.cache is None or self.cache.capacity < needed:
            # exactly what is needed: every forward attends over the whole capacity
            self.cache = RollbackCache(self.model, capacity=needed)
            self._hidden = {}
        return self.cache

    def _hidden_buffers(self, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Per-layer hidden-state buffers, preallocated at the cache's capacity and reused."""
        for layer in layers:
            if layer not in self._hidden:
                size = (self.cache.capacity, self.model.config.hidden_size)
                self._hidden[layer] = torch.empty(size, dtype=self.dtype, device=self.device)
        return {layer: self._hidden[layer] for layer in layers}

    @torch.inference_mode()  # lighter than no_grad: decoding never feeds autograd
    def forward(
        self,
        input_ids: torch.Tensor,
        start: int,
        depths: torch.Tensor,
        visible: torch.Tensor,
        *,
        hidden: bool = False,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the target on ``input_ids`` written at slots ``start ..``: each row sees slots ``< start``
        and the new rows ``visible`` marks; positions are ``start + depths``. Returns logits [rows, vocab]
        and, with ``hidden``, transformers' ``hidden_states`` tuple."""
        cache = self.cache
        rows = input_ids.numel()
        mask = torch.full((rows, cache.capacity), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        mask[:, :start] = 0.0
        mask[:, start : start + rows].masked_fill_(visible.to(self.device), 0.0)
        cache.write_at(start)
        config = self.model.config
        own_attention = config._attn_implementation
        if rows > 1 and own_attention == "sdpa" and self.device.type == "cpu" and SDPA_HAS_GROUPS:
            # per call, so the target model itself is left as it was (a GPU's SDPA kernels want no mask with GQA)
            config._attn_implementation = GROUPED_SDPA
        began = time.perf_counter()
        try:
            out = self.model(
                input_ids=input_ids.view(1, -1).to(self.device),
                position_ids=(depths + start).view(1, -1).to(self.device),
                attention_mask=mask.view(1, 1, rows, -1),
                past_key_values=cache.cache,
                use_cache=True,
                output_hidden_states=hidden,
                logits_to_keep=1 if last_logits_only else 0,
            )
        finally:
            config._attn_implementation = own_attention
        self.target_s += time.perf_counter() - began
        return out.logits[0].float(), out.hidden_states if hidden else None

    def _choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(warp(logits, self.sampling), 1, generator=generator))

    @torch.inference_mode()  # lighter than no_grad: decoding never feeds autograd
    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        drafter: Drafter,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        planner: DraftPlanner | None = None,
    ) -> Generation:
        """Decode ``prompt_ids`` with ``drafter``; a ``planner`` sizes every draft (``tree_nodes=auto``)."""
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        if prompt.numel() == 0:
            raise DraftsmithError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise DraftsmithError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        began = time.perf_counter()
        self.target_s = 0.0
        declared = drafter.max_draft_nodes()
        draft_room = self.max_draft_nodes if declared is None else min(declared, self.max_draft_nodes)
        capacity_needed = prompt.numel() + max_new_tokens + draft_room + 2
        cache = self._ensure_capacity(capacity_needed)
        layers = drafter.target_needs().hidden_layers
        buffers = self._hidden_buffers(layers)
        drafter.reset()
        if isinstance(drafter, UsesDecoder):
            drafter.attach_decoder(self)

        n = prompt.numel()
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        logits, hidden = self.forward(prompt, 0, torch.arange(n), causal, hidden=bool(layers), last_logits_only=True)
        for layer, buffer in buffers.items():
            buffer[:n] = hidden[layer][0]
        first = self._choose(logits[-1], generator)
        result = Generation(tokens=[first])
        tokens = torch.empty(cache.capacity, dtype=torch.long)
        tokens[:n] = prompt
        tokens[n] = first
        length, new_from, drafter_s = n + 1, 0, 0.0

        while len(result.tokens) < max_new_tokens and result.tokens[-1] not in self.eos_ids:
            room = min(self.max_draft_nodes, cache.capacity - length - 1)
            if planner is not None:
                room = min(room, planner.plan(cache.capacity))
            drafted = time.perf_counter()
            if room > 0:
                state = DecodeState(
                    tokens=tokens[:length],
                    prompt_len=n,
                    hidden={layer: buffer[: length - 1] for layer, buffer in buffers.items()},
                    new_from=new_from,
                    sampling=self.sampling,
                    generator=generator,
                )
                target_before = self.target_s
                draft = drafter.propose(state)
                # forwards a self-drafting drafter ran through this engine are drafter time, not verification
                self.target_s = target_before
                tree.validate(draft)
                draft = tree.truncate(draft, room)
            else:
                draft = Draft.empty()
            verifying = time.perf_counter()
            start = length - 1
            verdict, kept_rows, hidden = self._verify(draft, tokens, start, bool(layers), generator)
            for layer, buffer in buffers.items():
                buffer[start : start + kept_rows.numel()] = hidden[layer][0, kept_rows.to(self.device)]

            new = draft.tokens[verdict.path].tolist() + [verdict.bonus]
            new = self._cut(new, max_new_tokens - len(result.tokens))
            result.tokens.extend(new)
            tokens[length : length + len(new)] = torch.tensor(new)
            if room > 0:  # a drafter keeping incremental state reads from the first position it has not seen
                new_from = start
            length += len(new)
            ended = time.perf_counter()
            draft_s = verifying - drafted if room > 0 else 0.0
            drafter_s += draft_s
            record = StepRecord(
                appended=len(new),
                accepted=len(verdict.path),
                offered=verdict.offered,
                rows=len(draft) + 1,
                draft_s=draft_s,
                verify_s=ended - verifying,
            )
            result.steps.append(record)
            if planner is not None:
                planner.observe(verdict, record)

        result.wall_s = time.perf_counter() - began
        result.target_s, result.drafter_s = self.target_s, drafter_s
        return result

    def _verify(
        self, draft: Draft, tokens: torch.Tensor, start: int, hidden: bool, generator: torch.Generator | None
    ) -> tuple[acceptance.Verdict, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Verify ``draft`` below the root ``tokens[start]`` in one forward, accept, and compact the accepted
        path's cache entries. Returns the verdict, the rows kept (root + path) and the hidden states."""
        shape = tree.layout(draft.parents)
        step_input = torch.cat([tokens[start : start + 1], draft.tokens])
        logits, states = self.forward(step_input, start, shape.depths, shape.visible, hidden=hidden)
        if self.sampling.greedy:
            verdict = acceptance.accept_greedy(draft, shape, logits)
        else:
            verdict = acceptance.accept_sampling(draft, shape, logits, self.sampling, generator)
        if verdict.path:
            src = (start + 1 + torch.tensor(verdict.path)).to(self.device)
            dst = torch.arange(start + 1, start + 1 + len(verdict.path), device=self.device)
            self.cache.move(src, dst)
        return verdict, torch.tensor([0] + [node + 1 for node in verdict.path]), states

    def _cut(self, new: list[int], room: int) -> list[int]:
        """Stop at the first end-of-sequence token and at the token budget."""
        new = new[:room]
        for i, token in enumerate(new):
            if token in self.eos_ids:
                return new[: i + 1]
        return new
