"""Token ids of a chat, built the way the target reads it while it writes: segment by segment.

A conversation's ids are: template(system, user 1, assistant header) + answer 1 + template(end of turn,
user 2, assistant header) + answer 2 ... The template segments come from ``tokenizer.apply_chat_template``
rendered around a sentinel answer, so any append-only chat template works; the answers are the exact ids
the target generated (never re-tokenized), so the stored row is exactly what the target conditioned on.
"""

from __future__ import annotations

from typing import Any

from draftsmith.drafters.chat_templates import NAMED_TEMPLATES
from draftsmith.drafters.errors import DraftsmithError

SENTINEL = "\x1eDRAFTSMITH-ANSWER\x1e"


def resolve_template(tokenizer: Any, chat_template: str | None) -> str:
    """The Jinja chat template in use: a named one, a literal one, or the tokenizer's own."""
    template = NAMED_TEMPLATES.get(chat_template, chat_template) if chat_template else None
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise DraftsmithError(
            "the target's tokenizer has no chat template; set target.chat_template (or data.chat_template) to a "
            "Jinja template or one of: " + ", ".join(NAMED_TEMPLATES)
        )
    return template


class ChatTemplate:
    """Template segments of one tokenizer's chat template."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, chat_template)
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        self.stop_ids = self._stop_ids()

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self.system + messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def first_prompt(self, user: str) -> list[int]:
        """System header (the template's default unless configured), user turn, assistant header."""
        return self.encode(self.render([{"role": "user", "content": user}], generation_prompt=True))

    def next_prompt(self, earlier_users: list[str], user: str, answer_stopped: bool) -> list[int]:
        """What follows an answer: the end of that turn (unless the target wrote its end-of-turn token
        itself), then the next user turn and the assistant header."""
        history: list[dict[str, str]] = []
        for text in earlier_users:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": SENTINEL}]
        closed = self.render(history, generation_prompt=False)
        opened = self.render(history + [{"role": "user", "content": user}], generation_prompt=True)
        if not opened.startswith(closed):
            raise DraftsmithError(
                "the target's chat template rewrites earlier turns when a turn is added; multi-turn regeneration "
                "needs an append-only template (use single-turn prompts or data.limit with one turn)"
            )
        tail = closed[closed.rindex(SENTINEL) + len(SENTINEL) :]
        if answer_stopped:
            tail = self._after_stop_token(tail)
        return self.encode(tail + opened[len(closed) :])

    def end_of_turn_text(self) -> str:
        """The template text right after an answer (for SmolLM2: ``<|im_end|>\\n``)."""
        closed = self.render(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}], generation_prompt=False
        )
        return closed[closed.rindex(SENTINEL) + len(SENTINEL) :]

    def _stop_ids(self) -> list[int]:
        """End-of-turn ids: the tokenizer's eos plus the special token the template closes an answer with."""
        tokenizer = self.tokenizer
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        tail = self.end_of_turn_text().strip()
        special = set(tokenizer.all_special_ids)
        for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"][:1]:
            if token_id in special and token_id not in ids:
                ids.append(token_id)
        if not ids:
            raise DraftsmithError("the target's tokenizer has no eos token and its chat template no end-of-turn token")
        return ids

    def _after_stop_token(self, tail: str) -> str:
        for stop in self.stop_ids:
            text = self.tokenizer.decode([stop])
            at = tail.find(text)
            if text and at >= 0 and not tail[:at].strip():
                return tail[at + len(text) :]
        return tail
