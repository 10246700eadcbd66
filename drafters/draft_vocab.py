"""A truncated draft vocabulary (``drafter.draft_vocab=N``; null = the target's whole vocabulary).

A trained drafter's vocabulary projection costs a large share of a target forward on a CPU (issue 19: four rows
against SmolLM2's 49,152-token LM head cost 0.29 of a float32 forward, 0.03 at 8,192 rows), and most of those
rows are tokens the target hardly ever writes. With a draft vocabulary the drafter projects onto the N most
frequent target-written tokens of its distillation data instead. What that changes, for every kind that uses it
(the multi-head drafters and the feature drafters):

- the map: built once before training from token counts (`most_frequent`), saved with the drafter's weights (the
  ``vocab_map.ids`` buffer, so an export carries it in model.safetensors beside ``draft_vocab`` in config.json)
  and restored by loading;
- projection: onto N rows of the LM head (`DraftVocab.rows`), so logits are over draft ids 0..N-1;
- proposals: draft ids become full-vocabulary ids again (`full_ids`) before the engine sees them, and the target
  verifies over its whole vocabulary, so decoding stays lossless;
- training: a position whose target token is outside the map counts neither in the loss nor in the hit counts
  (`keep_inside`); a KL loss compares with the target's distribution renormalised over the map (`restrict`).

The ids are kept sorted by token id, not by frequency, so full -> draft is a binary search with no table the size
of the whole vocabulary.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from draftsmith.drafters.errors import DraftsmithError


def check_size(kind: str, size: int | None, vocab: int | None = None, candidates: int = 1) -> None:
    """One line when ``draft_vocab`` cannot be: below 1 or below the ``candidates`` a drafter takes per position
    (its tree_topk), or (once the target is known) above the target's vocabulary."""
    if size is None:
        return
    if size < max(candidates, 1):
        why = f" (the drafter takes its top {candidates} candidates from it)" if candidates > 1 else ""
        raise DraftsmithError(
            f"{kind} draft_vocab={size}: give at least {max(candidates, 1)} tokens{why}, or null for all of them"
        )
    if vocab is not None and size > vocab:
        raise DraftsmithError(
            f"{kind} draft_vocab={size} is larger than the target's vocabulary of {vocab} tokens: give at most "
            f"{vocab} (null = the whole vocabulary)"
        )


def most_frequent(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ids of the ``size`` largest ``counts [V]`` (ties go to the smaller id), sorted by id."""
    check_size("the", size, counts.numel())
    ranked = torch.sort(counts, descending=True, stable=True).indices[:size]
    return ranked.sort().values


def coverage(counts: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of the counted tokens whose id is among ``ids`` (0 when nothing was counted)."""
    total = float(counts.sum())
    return float(counts[ids.to(counts.device)].sum()) / total if total else 0.0


class DraftVocab(nn.Module):
    """The map: ``ids[j]`` is the full-vocabulary id of draft id j (ascending). Until it is built (`set_ids`) or
    loaded with the drafter's weights it holds -1, and using it is an error that says so."""

    def __init__(self, size: int) -> None:
        super().__init__()
        check_size("the", size)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self._rows: dict[tuple, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return self.ids.numel()

    @property
    def ready(self) -> bool:
        return bool(self.ids[0] >= 0)

    def set_ids(self, ids: torch.Tensor) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() != self.size or ids.unique().numel() != self.size or bool((ids < 0).any()):
            raise DraftsmithError(f"a draft vocabulary of {self.size} needs {self.size} distinct token ids >= 0")
        with torch.no_grad():
            self.ids.copy_(ids.sort().values)
        self._rows.clear()

    def _built(self) -> torch.Tensor:
        if not self.ready:
            raise DraftsmithError(
                "the draft vocabulary (draft_vocab) has no map yet: training builds it from the distilled data "
                "and the export carries it; load the drafter from its export"
            )
        return self.ids

    def to_full(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids of draft ids (any shape), on the draft ids' device."""
        ids = self._built()
        return ids[draft_ids.to(ids.device)].to(draft_ids.device)

    def to_draft(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For full-vocabulary ``tokens``: which lie inside the map, and their draft ids (meaningless outside)."""
        ids = self._built()
        tokens = tokens.to(ids.device)
        draft = torch.searchsorted(ids, tokens).clamp_max(self.size - 1)
        return ids[draft] == tokens, draft

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight``'s rows of the map (an LM head ``[V, H]`` or its bias ``[V]``), sliced once and reused while
        neither the weight nor the map changes: slicing N rows per draft would cost a good part of what it saves."""
        ids = self._built()
        key = (weight.data_ptr(), weight.device, weight.dtype, ids.data_ptr(), ids._version)
        sliced = self._rows.get(key)
        if sliced is None:
            # a slice made under the evaluator's inference_mode could not be used by training later on
            with torch.inference_mode(False):
                sliced = weight.detach()[ids.to(weight.device)]
            self._rows = {key: sliced, **{k: v for k, v in self._rows.items() if k[0] != key[0]}}
        return sliced

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ``logits [..., V]`` as log-probabilities over the map (renormalised on it)."""
        ids = self._built()
        return torch.log_softmax(logits[..., ids.to(logits.device)].float(), dim=-1)


def install(vocab: DraftVocab | None, kind: str, ids: torch.Tensor) -> DraftVocab:
    """Give a drafter's map the ids training chose; one line when the drafter was made without ``draft_vocab``."""
    if vocab is None:
        raise DraftsmithError(f"this {kind} drafter has no draft_vocab: set drafter.draft_vocab=N")
    vocab.set_ids(ids)
    return vocab


def full_ids(vocab: DraftVocab | None, draft_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary ids of a drafter's candidates: through the map if it has one, else unchanged."""
    return draft_ids if vocab is None else vocab.to_full(draft_ids)


def keep_inside(
    vocab: DraftVocab, rows: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss masking: of the counted (row, position, label) triples only those whose label lies inside the map,
    with the label as a draft id. The rest count neither in the loss nor in the hit counts."""
    inside, draft = vocab.to_draft(labels)
    inside = inside.to(labels.device)
    return rows[inside], positions[inside], draft.to(labels.device)[inside]


@runtime_checkable
class UsesDraftVocab(Protocol):
    """A drafter that can project onto a draft vocabulary: ``vocab_map`` is None without ``draft_vocab``;
    `set_draft_vocab` installs the map training built (before the first training step)."""

    vocab_map: DraftVocab | None

    def set_draft_vocab(self, ids: torch.Tensor) -> None: ...
