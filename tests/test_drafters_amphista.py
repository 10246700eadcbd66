"""Amphista on a tiny random Llama: who sees whom (bidirectional slots, causal adaptation), incremental
decoding against full recomputation, the identity start, the KL loss, gradients and persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from safetensors.torch import load_file

from draftsmith.drafters.amphista import AmphistaConfig, AmphistaDrafter
from draftsmith.drafters.base import DecodeState, Drafter
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter

HEADS = 3


@pytest.fixture(scope="module")
def target():
    return tiny_llama()


@pytest.fixture(scope="module")
def sequence(target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """24 tokens, the target's last hidden states and logits for them."""
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    out = target(ids, output_hidden_states=True)
    return ids, out.hidden_states[-1], out.logits


def amphista(target, randomized: bool = False, **options) -> AmphistaDrafter:
    config = AmphistaConfig(num_heads=HEADS, attention_heads=4, tree_nodes=10, tree_topk=4, **options)
    drafter = AmphistaDrafter(config)
    drafter.bind(target)
    if randomized:  # a trained-looking drafter: identity init would hide every interaction
        torch.manual_seed(1)
        with torch.no_grad():
            for param in drafter.parameters():
                param.normal_(0.0, 0.3)
    return drafter.eval()


def full_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def test_every_slot_sees_every_other_slot(target) -> None:
    drafter = amphista(target, randomized=True)
    slots = torch.randn(5, HEADS, 32)
    base = drafter.auto_embed(slots)
    for j in range(HEADS):
        perturbed = slots.clone()
        perturbed[:, j] += torch.randn(32)  # not a constant: the pre-norm would cancel a uniform shift
        changed = (drafter.auto_embed(perturbed) - base).abs().amax(dim=(0, 2))
        assert (changed > 1e-4).all(), f"perturbing slot {j} left some slot unchanged: {changed}"


def test_adaptation_layers_are_causal(target, sequence) -> None:
    ids, hidden, _ = sequence
    drafter = amphista(target, randomized=True)
    mask = torch.ones_like(ids)
    base = drafter.head_inputs(hidden, {"input_ids": ids, "attention_mask": mask})
    for t in (3, 10):
        perturbed = hidden.clone()
        perturbed[:, t + 1] += 1.0
        moved = drafter.head_inputs(perturbed, {"input_ids": ids, "attention_mask": mask})
        assert torch.allclose(moved[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert (moved[:, t + 1 :] - base[:, t + 1 :]).abs().amax(dim=(0, 2, 3)).gt(1e-4).all()
        other_token = ids.clone()
        other_token[:, t + 2] = (ids[:, t + 2] + 1) % 128  # position t+1 pairs h_{t+1} with token t+2
        moved = drafter.head_inputs(hidden, {"input_ids": other_token, "attention_mask": mask})
        assert torch.allclose(moved[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert not torch.allclose(moved[:, t + 1], base[:, t + 1], atol=1e-4)


def test_incremental_decoding_equals_full_recomputation(target, sequence) -> None:
    ids, hidden, _ = sequence
    drafter = amphista(target, randomized=True)
    full = drafter.head_inputs(hidden, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
    lm_head = target.lm_head.weight
    previous = 0
    # the evaluator's pattern: prefill, then steps appending 1..4 tokens; then one call repeated
    for length in (7, 8, 12, 13, 16, 20, 20):
        state = DecodeState(
            tokens=ids[0, :length], prompt_len=6, hidden={-1: hidden[0, : length - 1]}, new_from=previous
        )
        expected = drafter.heads.all_logits(full[length - 2], lm_head)
        assert torch.allclose(drafter.draft_logits(state), expected, atol=1e-4), length
        draft = drafter.propose(state)
        assert draft.tokens[:4].tolist() == expected[0].topk(4).indices.tolist()
        previous = length - 1
    drafter.reset()
    state = DecodeState(tokens=ids[0, :9], prompt_len=6, hidden={-1: hidden[0, :8]})
    assert torch.allclose(drafter.draft_logits(state), drafter.heads.all_logits(full[7], lm_head), atol=1e-4)


def test_fresh_amphista_computes_what_fresh_medusa_does(target, sequence) -> None:
    ids, hidden, logits = sequence
    fresh = amphista(target)
    medusa = MedusaDrafter(MedusaConfig(num_heads=HEADS, tree_nodes=10, tree_topk=4))
    medusa.bind(target)
    state = DecodeState(tokens=ids[0, :12], prompt_len=6, hidden={-1: hidden[0, :11]})
    assert torch.allclose(fresh.draft_logits(state), medusa.draft_logits(state), atol=1e-5)
    assert torch.allclose(fresh.draft_logits(state)[0], logits[0, 10], atol=1e-5)
    assert torch.equal(fresh.propose(state).tokens, medusa.propose(state).tokens)


def test_kl_loss_against_the_target_distribution(target, sequence) -> None:
    ids, hidden, logits = sequence
    drafter = amphista(target, loss_type="kl", loss_decay=0.5)
    assert drafter.target_needs().logits
    batch = full_batch(ids)
    out = drafter.loss(batch, {"hidden": {-1: hidden}, "logits": logits})
    # a fresh drafter's head k at t outputs the target's logits at t; the reference is the target at t+k
    expected = 0.0
    for k in range(1, HEADS + 1):
        terms = [
            F.kl_div(
                F.log_softmax(logits[0, t], -1), F.log_softmax(logits[0, t + k], -1), log_target=True, reduction="sum"
            )
            for t in range(ids.shape[1] - k - 1)
        ]
        expected += 0.5 ** (k - 1) * torch.stack(terms).mean()
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-4)
    assert out.counts.tolist() == [ids.shape[1] - k - 1 for k in range(1, HEADS + 1)]
    with pytest.raises(DraftsmithError, match="loss_type=kl"):
        drafter.loss(batch, {"hidden": {-1: hidden}})


def test_gradients_reach_only_the_drafter(target, sequence) -> None:
    ids, hidden, _ = sequence
    drafter = amphista(target).train()
    batch = full_batch(ids)
    batch["loss_mask"][:, :8] = 0
    batch["attention_mask"][:, 20:] = 0
    out = drafter.loss(batch, {"hidden": {-1: hidden}})
    assert out.hits.shape == (HEADS, 4)
    out.loss.backward()
    assert all(p.grad is not None for p in drafter.parameters())
    assert drafter.fuse.weight.grad[:, 32:].abs().sum() > 0, "the token embedding half of the fusion must learn"
    assert all(p.grad is None for p in target.parameters())
    assert not any(target.config.vocab_size in t.shape for t in drafter.state_dict().values())


def test_save_and_load_round_trip(target, tmp_path) -> None:
    drafter = amphista(target, randomized=True, share_lm_head=False, num_stages=3, ffn_size=48)
    drafter.set_tree([(0,), (0, 0), (0, 1), (0, 0, 2)])
    drafter.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(drafter.state_dict())
    loaded = Drafter.from_pretrained(tmp_path, target=target)
    assert isinstance(loaded, AmphistaDrafter) and loaded.config == drafter.config
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_stages_split_heads_into_contiguous_groups() -> None:
    assert AmphistaConfig(num_heads=4, num_stages=2).head_groups() == [0, 0, 1, 1]
    assert AmphistaConfig(num_heads=5, num_stages=2).head_groups() == [0, 0, 0, 1, 1]
    assert AmphistaConfig(num_heads=3, num_stages=3).head_groups() == [0, 1, 2]
    with pytest.raises(DraftsmithError, match="num_stages"):
        AmphistaConfig(num_heads=2, num_stages=3)
    with pytest.raises(DraftsmithError, match="loss_type"):
        AmphistaConfig(loss_type="mse")


def test_smollm2_sized_drafter_stays_modest() -> None:
    drafter = AmphistaDrafter(AmphistaConfig(hidden_size=576, vocab_size=49152))
    count = sum(p.numel() for p in drafter.parameters())
    assert 5e6 < count < 15e6, count
