"""Self-distillation: the frozen target answers every user turn, in order, in length-sorted batches.

Multi-turn conversations are answered turn by turn: turn t of every conversation is generated in one round
of batches, given the earlier turns' regenerated answers. Rows hold the exact ids the target read and wrote;
``loss_mask`` is 1 exactly on the ids it wrote (its end-of-turn token included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from draftsmith.data.config import DataConfig
from draftsmith.data.prompts import Conversation
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.target import Target


@dataclass
class _Chat:
    conversation: Conversation
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    prompt_len: int = 0
    answered: int = 0
    truncated: int = 0
    last_stopped: bool = True
    closed: bool = False  # no room left in the context for another turn

    def row(self) -> dict[str, Any]:
        return {
            "id": self.conversation.id,
            "category": self.conversation.category,
            "input_ids": self.ids,
            "loss_mask": self.mask,
            "n_turns": self.answered,
            "prompt_len": self.prompt_len,
            "n_target_tokens": sum(self.mask),
            "n_truncated": self.truncated,
        }


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: generation appends on the right for every row at once."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(new: Sequence[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The new ids through the first stop id, and whether there was one (False: the answer was cut at the limit)."""
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(new) if token in stops), None)
    return (list(new[: end + 1]), True) if end is not None else (list(new), False)


class AnswerEngine(Protocol):
    """What writes the target's answers to a list of prompts (ids): transformers' ``generate`` by default, vLLM
    with ``data.engine=vllm`` (data/vllm_engine.py)."""

    # Prompts per call; None: all of a turn's prompts at once (the engine schedules its own batches).
    batch_size: int | None

    def answer(self, prompts: list[list[int]], stop_ids: list[int]) -> list[tuple[list[int], bool]]:
        """Per prompt: the new ids (through the first stop id) and whether it stopped."""
        ...


@torch.inference_mode()
def generate_batch(
    target: Target, prompts: list[list[int]], cfg: DataConfig, stop_ids: list[int]
) -> list[tuple[list[int], bool]]:
    """One batched ``generate`` call: per prompt, the new ids (through the first stop id) and whether it stopped."""
    pad_id = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else stop_ids[0]
    ids, mask = left_pad(prompts, pad_id, target.device)
    sampling = (
        {"do_sample": False}
        if cfg.greedy
        else {"do_sample": True, "temperature": float(cfg.temperature), "top_p": float(cfg.top_p), "top_k": 0}
    )
    extra = {"cache_implementation": "static"} if cfg.cache_implementation == "static" else {}
    out = target.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **sampling,
        **extra,
    )
    return [cut_at_stop(new, stop_ids) for new in out[:, ids.shape[1] :].tolist()]


@dataclass
class TransformersEngine:
    """``data.engine=transformers``: left-padded batches of ``data.batch_size`` through ``model.generate``."""

    target: Target
    cfg: DataConfig

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def answer(self, prompts: list[list[int]], stop_ids: list[int]) -> list[tuple[list[int], bool]]:
        return generate_batch(self.target, prompts, self.cfg, stop_ids)


def _context_limit(target: Target) -> int:
    return int(getattr(target.model.config, "max_position_embeddings", None) or 1 << 30)


def regenerate(
    target: Target,
    conversations: list[Conversation],
    cfg: DataConfig,
    on_batch: Callable[[int], None] | None = None,
    engine: AnswerEngine | None = None,
) -> list[dict[str, Any]]:
    """Rows (in the order of ``conversations``) with every user turn answered by the target, through ``engine``
    (default: transformers' ``generate``).

    ``on_batch(new_target_tokens)`` is called after each engine call (for progress bars). A conversation
    whose next turn would not fit the target's context stops there; one whose first turn does not fit
    gives no row.
    """
    engine = engine if engine is not None else TransformersEngine(target, cfg)
    template = ChatTemplate(target.tokenizer, cfg.system_prompt, cfg.chat_template)
    chats = [_Chat(c) for c in conversations]
    limit = _context_limit(target)
    for turn in range(max((len(c.turns) for c in conversations), default=0)):
        pending: list[tuple[_Chat, list[int]]] = []
        for chat in chats:
            turns = chat.conversation.turns
            if chat.closed or turn >= len(turns):
                continue
            if turn == 0:
                prompt = template.first_prompt(turns[0])
            else:
                prompt = template.next_prompt(turns[:turn], turns[turn], chat.last_stopped)
            if len(chat.ids) + len(prompt) + cfg.max_new_tokens > limit:
                chat.closed = True
                continue
            pending.append((chat, prompt))
        # Longest first: similar lengths share a batch (less padding), and a memory problem shows up at once.
        pending.sort(key=lambda item: len(item[0].ids) + len(item[1]), reverse=True)
        step = engine.batch_size or max(len(pending), 1)
        for start in range(0, len(pending), step):
            batch = pending[start : start + step]
            answers = engine.answer([chat.ids + prompt for chat, prompt in batch], template.stop_ids)
            for (chat, prompt), (answer, stopped) in zip(batch, answers):
                if turn == 0:
                    chat.prompt_len = len(prompt)
                chat.ids += prompt + answer
                chat.mask += [0] * len(prompt) + [1] * len(answer)
                chat.answered += 1
                chat.truncated += not stopped
                chat.last_stopped = stopped
            if on_batch is not None:
                on_batch(sum(len(answer) for answer, _ in answers))
    return [chat.row() for chat in chats if chat.answered]
