"""Medusa and Amphista on the real embedded target (SmolLM2-135M-Instruct, tied embeddings, vocab 49152)."""

from __future__ import annotations

import pytest
import torch

from draftsmith.drafters.amphista import AmphistaConfig, AmphistaDrafter
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.eval.engine import SpeculativeDecoder, eos_token_ids

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def chat_ids(target) -> list[int]:
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    text = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return target.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("drafter_class", [MedusaDrafter, AmphistaDrafter])
def test_fresh_drafter_trains_and_decodes_losslessly_on_smollm2(real_target, drafter_class: type[Drafter]) -> None:
    config = (MedusaConfig if drafter_class is MedusaDrafter else AmphistaConfig)(tree_nodes=15)
    drafter = drafter_class(config)
    drafter.bind(real_target.model)
    assert (drafter.config.hidden_size, drafter.config.vocab_size) == (576, 49152)

    prompt = chat_ids(real_target)
    decoder = SpeculativeDecoder(real_target.model, eos_ids=eos_token_ids(real_target.model, real_target.tokenizer))
    plain = decoder.generate(prompt, PlainDrafter(), 8)
    speculative = decoder.generate(prompt, drafter.eval(), 8)
    assert speculative.tokens == plain.tokens

    ids = torch.tensor([prompt + plain.tokens])
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, len(prompt) :] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    with torch.no_grad():
        out = real_target.model(ids, output_hidden_states=True)
    result = drafter.train().loss(batch, {"hidden": {-1: out.hidden_states[-1]}})
    assert torch.isfinite(result.loss) and result.counts[0] == len(plain.tokens)
    result.loss.backward()
    assert all(p.grad is not None for p in drafter.parameters())
    assert all(p.grad is None for p in real_target.model.parameters())
