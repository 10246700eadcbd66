"""How far a LoRA-adapted target (Medusa-2) has moved from the original one, on the evaluation's questions.

Medusa-2 serves the adapted target, so its tau and speedup say nothing about whether the answers are still
the original model's. Two figures do, both against the original target's greedy answers:
- ``top1_agreement``: the fraction of the original's answer tokens that the adapted target also ranks first
  in the same context (teacher forcing, one forward per turn).
- ``identical_answers``: the fraction of turns whose greedy answers are the same token for token, each model
  continuing its own conversation (greedy evaluations only: sampled answers differ by design).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.target import Target
from draftsmith.eval.engine import SpeculativeDecoder, eos_token_ids
from draftsmith.eval.questions import Dialogue, Question


@dataclass(frozen=True)
class Turn:
    """One greedy answer of a model and the prompt it answered (the conversation so far)."""

    prompt: list[int]
    tokens: list[int]


@torch.inference_mode()
def greedy_turns(
    target: Target, questions: Sequence[Question], max_new_tokens: int, progress: bool = True
) -> list[list[Turn]]:
    """Plain greedy answers of ``target`` to every turn of every question (multi-turn, its own history)."""
    decoder = SpeculativeDecoder(target.model, eos_ids=eos_token_ids(target.model, target.tokenizer))
    template = ChatTemplate(target.tokenizer)
    answers = []
    for question in tqdm(questions, desc="original target, greedy", unit="q", disable=not progress):
        dialogue = Dialogue(template)
        turns = []
        for text in question.turns:
            prompt, generation = dialogue.answer(decoder, text, PlainDrafter(), max_new_tokens)
            turns.append(Turn(prompt, generation.tokens))
        answers.append(turns)
    return answers


@torch.inference_mode()
def top1_agreement(model: torch.nn.Module, turns: Sequence[Turn]) -> tuple[int, int]:
    """(tokens of ``turns`` that ``model`` ranks first given the same prefix, tokens compared)."""
    agreed = compared = 0
    device = next(model.parameters()).device
    for turn in turns:
        if not turn.tokens:
            continue
        ids = torch.tensor([turn.prompt + turn.tokens], device=device)
        # the logits that predict each answer token: the last prompt position up to the answer's second-to-last
        logits = model(input_ids=ids, logits_to_keep=len(turn.tokens) + 1).logits[0, :-1]
        agreed += int((logits.argmax(-1).cpu() == torch.tensor(turn.tokens)).sum())
        compared += len(turn.tokens)
    return agreed, compared


def adapter_drift(
    adapted: torch.nn.Module, original: Sequence[Sequence[Turn]], adapted_answers: Sequence[Sequence[list[int]]] | None
) -> dict[str, float | None]:
    """The two figures of the module docstring; ``adapted_answers`` (greedy token lists per question and turn,
    or None for a sampled evaluation) must follow ``original``'s questions and turns."""
    agreed, compared = top1_agreement(adapted, [turn for turns in original for turn in turns])
    identical = None
    if adapted_answers is not None:
        pairs = [
            (turn.tokens, tokens)
            for turns, answers in zip(original, adapted_answers, strict=True)
            for turn, tokens in zip(turns, answers, strict=True)
        ]
        identical = sum(a == b for a, b in pairs) / len(pairs)
    return {"top1_agreement": agreed / compared if compared else None, "identical_answers": identical}
