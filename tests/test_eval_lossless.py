"""Greedy speculative decoding reproduces plain greedy decoding, for random trees and every drafter."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from draftsmith.drafters.base import DecodeState, Draft, TargetNeeds
from draftsmith.drafters.layerskip import LayerSkipConfig, LayerSkipDrafter
from draftsmith.drafters.ngram import NgramConfig, NgramDrafter
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.testing import RandomTreeConfig, RandomTreeDrafter, assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def varied_llama(layers: int = 2, seed: int = 1) -> torch.nn.Module:
    """tiny_llama with an untied random LM head: tied, a random model just repeats its input token."""
    model = tiny_llama(vocab_size=VOCAB, hidden=32, layers=layers, seed=seed)
    head = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(seed))
    model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return varied_llama()


def test_the_cache_holds_only_the_draft_room_a_drafter_can_use(model):
    decoder = SpeculativeDecoder(model, eos_ids=set(), max_draft_nodes=64)
    decoder.generate([5, 9, 17], PlainDrafter(), 7)
    assert decoder.cache.capacity == 3 + 7 + 2  # plain decoding drafts nothing: no room reserved
    decoder = SpeculativeDecoder(model, eos_ids=set(), max_draft_nodes=64)
    decoder.generate([5, 9, 17], NgramDrafter(), 7)
    assert decoder.cache.capacity == 3 + 7 + 64 + 2  # no declared limit: the engine's own cap


def test_plain_engine_matches_recomputing_without_cache(model):
    prompt = [5, 9, 17, 3, 8]
    tokens = list(prompt)
    for _ in range(16):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    decoded = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, PlainDrafter(), 16).tokens
    assert decoded == tokens[len(prompt) :]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
    max_nodes=st.integers(1, 14),
    hit_rate=st.floats(0.0, 1.0),
    branching=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_random_trees_are_lossless(model, prompt, max_nodes, hit_rate, branching, seed):
    reference = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, PlainDrafter(), 20).tokens
    config = RandomTreeConfig(max_nodes=max_nodes, hit_rate=hit_rate, branching=branching, seed=seed)
    assert_lossless_greedy(model, RandomTreeDrafter(config, reference, VOCAB), [prompt], 20)


def test_good_trees_accept_many_tokens_per_step(model):
    prompt = [1, 2, 3]
    reference = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, PlainDrafter(), 30).tokens
    drafter = RandomTreeDrafter(RandomTreeConfig(max_nodes=8, hit_rate=1.0, branching=0.0), reference, VOCAB)
    result = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, drafter, 30)
    assert result.tokens == reference
    assert len(result.steps) < 15


@pytest.mark.parametrize("branches", [1, 3])
def test_ngram_is_lossless(model, branches):
    prompts = [[5, 9, 17, 3, 5, 9, 17, 3, 5, 9], [7, 7, 7, 7], list(range(20)) + list(range(10))]
    assert_lossless_greedy(model, NgramDrafter(NgramConfig(branches=branches)), prompts, 24)


def test_layerskip_is_lossless_and_drafts():
    model = varied_llama(layers=3)
    drafter = LayerSkipDrafter(LayerSkipConfig(skip_layers=[1], gamma=0.0))
    assert_lossless_greedy(model, drafter, [[5, 9, 17, 3], [1, 2, 3, 4, 5, 6]], 20)
    result = SpeculativeDecoder(model, eos_ids=set()).generate([5, 9, 17, 3], drafter, 20)
    assert sum(step.offered for step in result.steps) > 0


def test_generation_stops_at_eos_and_at_max_new_tokens(model):
    prompt = [5, 9, 17, 3]
    plain = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, PlainDrafter(), 20).tokens
    eos = plain[5]
    decoder = SpeculativeDecoder(model, eos_ids={eos})
    drafter = RandomTreeDrafter(RandomTreeConfig(max_nodes=10, hit_rate=1.0, branching=0.0), plain, VOCAB)
    stopped = decoder.generate(prompt, drafter, 20).tokens
    assert stopped == plain[: plain.index(eos) + 1]
    assert len(decoder.generate(prompt, drafter, 3).tokens) == 3


class HiddenCheckingDrafter(RandomTreeDrafter):
    """Checks that state.hidden equals the target's hidden states recomputed over the whole sequence."""

    def target_needs(self) -> TargetNeeds:
        return TargetNeeds(hidden_layers=(0, 1, -1))

    def bind(self, target: torch.nn.Module) -> None:
        self.__dict__["target_model"] = target

    def propose(self, state: DecodeState) -> Draft:
        full = self.target_model(state.tokens[:-1].view(1, -1), output_hidden_states=True).hidden_states
        for layer, seen in state.hidden.items():
            torch.testing.assert_close(seen, full[layer][0], atol=1e-4, rtol=1e-4)
        self.checked = getattr(self, "checked", 0) + 1
        return super().propose(state)


def test_hidden_states_follow_the_accepted_path(model):
    prompt = [4, 8, 15, 16, 23]
    reference = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, PlainDrafter(), 16).tokens
    drafter = HiddenCheckingDrafter(RandomTreeConfig(max_nodes=8, hit_rate=0.8, branching=0.5), reference, VOCAB)
    drafter.bind(model)
    assert_lossless_greedy(model, drafter, [prompt], 16)
    assert drafter.checked > 2


def test_qwen_family_target_is_lossless():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    qwen = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    prompt = [3, 1, 4, 1, 5]
    reference = SpeculativeDecoder(qwen, eos_ids=set()).generate(prompt, PlainDrafter(), 16).tokens
    trees = RandomTreeDrafter(RandomTreeConfig(max_nodes=10, hit_rate=0.8, branching=0.5), reference, VOCAB)
    assert_lossless_greedy(qwen, trees, [prompt], 16)
    assert_lossless_greedy(qwen, LayerSkipDrafter(LayerSkipConfig(skip_layers=[1], gamma=0.0)), [prompt], 16)
