"""The truncated draft vocabulary (drafters/draft_vocab.py): the map from token counts and its coverage, the loss
masking against a hand computation, the size checks, and drafters of every kind that use it training, exporting,
loading back with their map and decoding losslessly (greedy and sampled)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb, repetitive_llama, tiny_llama
from test_eval_sampling import VOCAB, assert_two_tokens_follow_the_target
from test_training_support import make_trainer, settings, tiny_drafter, tiny_rows, tiny_target

from draftsmith.drafters.base import DecodeState, Drafter
from draftsmith.drafters.draft_vocab import DraftVocab, check_size, coverage, most_frequent
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.sampling import SamplingConfig
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.testing import assert_lossless_greedy
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.module import DrafterModule, frozen_target_expected
from draftsmith.training.pipeline import drafter_config, prepare_draft_vocab

pytestmark = pytest.mark.usefixtures("one_thread")


def test_map_is_the_most_frequent_tokens_sorted_by_id_with_their_coverage():
    counts = torch.tensor([5, 0, 9, 2, 9, 1, 5, 0])
    ids = most_frequent(counts, 3)
    assert ids.tolist() == [0, 2, 4]  # 9, 9, then the tie 5 / 5 goes to the smaller id
    assert coverage(counts, ids) == pytest.approx((5 + 9 + 9) / 31)
    assert most_frequent(counts, 8).tolist() == list(range(8)) and coverage(counts, torch.arange(8)) == 1.0
    assert coverage(torch.zeros(4, dtype=torch.long), torch.tensor([1])) == 0.0


def test_token_counts_are_the_target_written_tokens_of_the_training_rows():
    rows = tiny_rows()
    data = DistillDataModule(rows, batch_size=4, val_fraction=0.25, max_length=64, pad_id=0)
    expected = torch.zeros(128, dtype=torch.long)
    for row in data.train_rows:
        for token, written in zip(rows[row]["input_ids"], rows[row]["loss_mask"]):
            expected[token] += written
    assert torch.equal(data.target_token_counts(128), expected) and 0 < expected.sum()


def test_translation_between_full_and_draft_ids():
    vocab = DraftVocab(3)
    with pytest.raises(DraftsmithError, match="no map yet"):
        vocab.to_full(torch.tensor([0]))
    vocab.set_ids(torch.tensor([40, 7, 19]))
    assert vocab.ids.tolist() == [7, 19, 40]
    assert vocab.to_full(torch.tensor([[2, 0], [1, 1]])).tolist() == [[40, 7], [19, 19]]
    inside, draft = vocab.to_draft(torch.tensor([19, 8, 40, 0, 99, 7]))
    assert inside.tolist() == [True, False, True, False, False, True]
    assert draft[inside].tolist() == [1, 2, 0]
    for wrong in ([1, 1, 2], [1, 2], [-1, 2, 3]):
        with pytest.raises(DraftsmithError, match="3 distinct token ids"):
            vocab.set_ids(torch.tensor(wrong))


def test_size_checks_fail_in_one_line():
    with pytest.raises(DraftsmithError, match="medusa draft_vocab=0: give at least 1"):
        MedusaConfig(draft_vocab=0, tree_topk=1)
    with pytest.raises(DraftsmithError, match="give at least 10 tokens .the drafter takes its top 10"):
        MedusaConfig(draft_vocab=5)
    with pytest.raises(DraftsmithError, match="larger than the target's vocabulary of 128 tokens"):
        tiny_drafter(tiny_target(), "medusa", draft_vocab=129)
    with pytest.raises(DraftsmithError, match="eagle3 draft_vocab=200 is larger"):
        tiny_drafter(tiny_target(), "eagle3", draft_vocab=200)
    check_size("medusa", None)
    check_size("medusa", 128, 128)
    with pytest.raises(DraftsmithError, match="this eagle3 drafter has no draft_vocab: set drafter.draft_vocab=N"):
        tiny_drafter(tiny_target(), "eagle3").set_draft_vocab(torch.arange(8))


def test_the_recipes_drafter_config_refuses_a_draft_vocab_below_one():
    """What `draftsmith-train drafter.draft_vocab=0` reads before anything slow (one_line_errors prints it)."""
    with pytest.raises(DraftsmithError, match="amphista draft_vocab=0: give at least 10 tokens"):
        drafter_config({"kind": "amphista", "draft_vocab": 0})
    assert drafter_config({"kind": "eagle3", "draft_vocab": 4096}).draft_vocab == 4096


def hand_loss(drafter: MedusaDrafter, batch, hidden, target_logits, decay: float):
    """The per-head loss and hits written out position by position, over the map's rows only; counts over every
    counted position (a label outside the map is a miss)."""
    ids = drafter.vocab_map.ids
    head = drafter.borrowed.get("lm_head", hidden.device, hidden.dtype)[ids]
    loss, hits, counts = 0.0, [], []
    for k in range(1, drafter.config.num_heads + 1):
        terms, head_hits, positions = [], [0] * drafter.config.tree_topk, 0
        for b, (tokens, inside, written) in enumerate(zip(*(batch[key].tolist() for key in batch))):
            for t in range(len(tokens) - k - 1):
                label = tokens[t + k + 1]
                if not (inside[t] and inside[t + k + 1] and written[t + k + 1]):
                    continue
                positions += 1
                if label not in ids.tolist():
                    continue
                logits = head @ drafter.heads.blocks[k - 1](hidden[b, t])
                draft_label = ids.tolist().index(label)
                if target_logits is None:
                    terms.append(torch.logsumexp(logits, 0) - logits[draft_label])
                else:
                    reference = torch.log_softmax(target_logits[b, t + k][ids], 0)
                    terms.append((reference.exp() * (reference - torch.log_softmax(logits, 0))).sum())
                rank = int((logits > logits[draft_label]).sum())
                if rank < len(head_hits):
                    head_hits[rank] += 1
        loss += decay ** (k - 1) * torch.stack(terms).mean()
        hits.append(head_hits)
        assert positions > len(terms)  # the batch has labels outside the map
        counts.append(positions)
    return loss, hits, counts


@pytest.mark.parametrize("loss_type", ["ce", "kl"])
def test_masked_loss_equals_a_hand_computation(loss_type):
    model = tiny_llama()
    drafter = MedusaDrafter(MedusaConfig(num_heads=2, tree_topk=3, tree_nodes=6, draft_vocab=40, loss_type=loss_type))
    drafter.bind(model)
    torch.manual_seed(0)
    perturb(drafter, 0.3)
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    drafter.set_draft_vocab(torch.tensor(list(dict.fromkeys(ids[0, 4:10].tolist() + list(range(60, 128))))[:40]))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * 14, [1] * 11 + [0] * 3]),
        "loss_mask": torch.tensor([[0] * 3 + [1] * 11, [0] * 5 + [1] * 9]),
    }
    out = model(ids, output_hidden_states=True)
    features = {"hidden": {-1: out.hidden_states[-1]}, "logits": out.logits}
    loss = drafter.loss(batch, features)
    expected, hits, counts = hand_loss(
        drafter, batch, out.hidden_states[-1], out.logits if loss_type == "kl" else None, 0.8
    )
    full = sum(1 for k in (1, 2) for b in (0, 1) for t in range(14 - k - 1) if batch["loss_mask"][b, t + k + 1])
    assert 0 < counts[0] and sum(counts) < full  # some labels fell outside the map and count nowhere
    assert loss.counts.tolist() == [float(c) for c in counts]
    assert loss.hits.tolist() == [[float(h) for h in row] for row in hits]
    torch.testing.assert_close(loss.loss, expected, rtol=1e-5, atol=1e-6)


def test_own_projections_start_from_the_maps_rows_of_the_lm_head():
    model = tiny_llama()
    drafter = MedusaDrafter(MedusaConfig(num_heads=2, tree_topk=3, tree_nodes=6, draft_vocab=20, share_lm_head=False))
    drafter.bind(model)
    assert drafter.heads.projections.shape == (2, 20, 32) and not bool(drafter.heads.copies_initialised)
    drafter.set_draft_vocab(torch.arange(50, 70))
    assert torch.equal(drafter.heads.projections[1], model.lm_head.weight[50:70])


KINDS = ["medusa", "amphista", "eagle3", "parallelspec"]


@pytest.mark.parametrize("kind", KINDS)
def test_trains_exports_loads_its_map_and_decodes_losslessly(kind, tmp_path, capsys):
    target = tiny_target()
    drafter = tiny_drafter(target, kind, draft_vocab=24)
    train_settings = settings(max_epochs=1, warmup_steps=0)
    data = DistillDataModule(tiny_rows(), batch_size=4, val_fraction=0.2, max_length=64, pad_id=0, sort_chunk=2)
    prepare_draft_vocab(drafter, data)
    counts = data.target_token_counts(128)
    assert torch.equal(drafter.vocab_map.ids, most_frequent(counts, 24))
    assert f"built): 24 of 128 tokens cover {coverage(counts, drafter.vocab_map.ids):.1%}" in capsys.readouterr().out
    before = {name: value.clone() for name, value in drafter.state_dict().items()}
    module = DrafterModule(drafter, target.model, train_settings)
    with frozen_target_expected():
        make_trainer(tmp_path, train_settings).fit(module, datamodule=data)
    assert any(not torch.equal(before[name], value) for name, value in drafter.state_dict().items())

    drafter.save_pretrained(tmp_path / "export")
    loaded = Drafter.from_pretrained(tmp_path / "export", target=target.model).eval()
    assert loaded.config.draft_vocab == 24 and torch.equal(loaded.vocab_map.ids, drafter.vocab_map.ids)
    state = decode_state(target.model, drafter.target_needs().hidden_layers)
    drafter.eval().reset()
    proposed = loaded.propose(state).tokens
    assert torch.equal(proposed, drafter.propose(state).tokens) and len(proposed) > 0
    assert set(proposed.tolist()) <= set(drafter.vocab_map.ids.tolist())  # full ids, all inside the map
    prompts = [[5], torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(0)).tolist()]
    assert_lossless_greedy(target.model, loaded, prompts, 24)


def decode_state(model: torch.nn.Module, layers: tuple[int, ...]) -> DecodeState:
    """A decoding state over a fixed 12-token sequence, with the target's hidden states of ``layers``."""
    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(2))
    hidden = model(tokens[None, :-1], output_hidden_states=True).hidden_states
    return DecodeState(tokens=tokens, prompt_len=4, hidden={layer: hidden[layer][0] for layer in layers})


def test_greedy_decoding_is_lossless_with_accepts_and_rejects():
    model = repetitive_llama()
    prompt = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, PlainDrafter(), 30).tokens
    drafter = MedusaDrafter(MedusaConfig(num_heads=3, tree_nodes=20, tree_topk=5, draft_vocab=32))
    drafter.bind(model)
    # a map holding every token the target writes here, filled up with the smallest ids
    drafter.set_draft_vocab(most_frequent(torch.bincount(torch.tensor(reference), minlength=128) + 0.5, 32))
    drafter.eval()
    assert_lossless_greedy(model, drafter, [[5], prompt], 30)
    steps = SpeculativeDecoder(model, eos_ids=set()).generate(prompt, drafter, 30).steps
    assert sum(s.accepted for s in steps) > 0 and sum(s.offered > s.accepted for s in steps) > 0


def test_sampled_decoding_keeps_the_target_distribution():
    """test_eval_sampling's engine check with a Medusa tree over half of the vocabulary (the odd ids, among them
    the target's favourite, 9): its candidates are deterministic, distinct siblings mapped back to full ids, so
    speculative sampling keeps the target's p. Temperature 4 flattens p, so the first draft token is accepted at
    times and rejected at others."""
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=1, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    drafter = MedusaDrafter(MedusaConfig(num_heads=2, tree_nodes=6, tree_topk=3, draft_vocab=VOCAB // 2))
    drafter.bind(model)
    drafter.set_draft_vocab(torch.arange(1, VOCAB, 2))
    torch.manual_seed(4)
    perturb(drafter, 0.3).eval()
    prompt, sampling = [3, 4, 5], SamplingConfig(temperature=4.0)
    assert_two_tokens_follow_the_target(model, drafter, prompt, sampling)
