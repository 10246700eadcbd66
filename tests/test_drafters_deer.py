"""DEER (drafters/deer.py): the block mask and the kept KV cache against a dense reference, the stage losses against
hand computations, lossless greedy (with and without DiffuSpec's options) and sampled decoding, the export, and a
pretrained diffusion LM from a folder."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from conftest import perturb, repetitive_llama, tiny_llama
from safetensors.torch import load_file
from test_eval_sampling import VOCAB, assert_two_tokens_follow_the_target

from draftsmith.drafters.base import Drafter
from draftsmith.drafters.deer import DeerConfig, DeerDrafter, Groups
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.sampling import SamplingConfig
from draftsmith.drafters.target import Target
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def deer(model: torch.nn.Module, noise: float = 0.0, **fields) -> DeerDrafter:
    """A DEER drafter built from ``model``'s layers, weights copied, optionally perturbed so every weight matters."""
    drafter = DeerDrafter(DeerConfig(**{"num_layers": 2, "block_size": 4, "cuts": 2, **fields}))
    drafter.bind(model)
    drafter.init_weights("target", model)
    if noise:
        torch.manual_seed(5)
        perturb(drafter, noise)
    return drafter.eval()


def reference_block(drafter: DeerDrafter, prefix: list[int], block: list[int | str]) -> torch.Tensor:
    """Hidden states of ``prefix`` then ``block`` (token ids, "M" = mask, "S" = separator) from one plain forward
    of the drafter's LM, no cache, with the mask written out: prefix rows causal, block rows see every row."""
    embed = drafter.lm.get_input_embeddings()
    special = {"M": drafter.mask_embed, "S": drafter.separator_embed}
    rows = [embed.weight[t] for t in prefix] + [special[t] if isinstance(t, str) else embed.weight[t] for t in block]
    n, total = len(prefix), len(prefix) + len(block)
    visible = torch.tensor([[j <= i if i < n else True for j in range(total)] for i in range(total)])
    out = drafter.lm.model(
        inputs_embeds=torch.stack(rows)[None],
        attention_mask=visible[None, None],
        position_ids=torch.arange(total)[None],
    )
    return out.last_hidden_state[0, n:]


@pytest.mark.parametrize("shift", [True, False])
def test_decoding_keeps_an_exact_cache_and_rolls_it_back(shift):
    model = tiny_llama(layers=2, seed=1)
    drafter = deer(model, noise=0.05, shift=shift)
    k = 3
    first = [5, 9, 40, 7]
    sequences = [
        first,  # empty cache: the whole prefix is computed
        first + [11, 12],  # accepted tokens extend the cache
        first + [11, 12, 13],
        first + [11, 60, 61],  # another continuation after 11: the cache is cut back to it (rollback)
        [8, 9],  # another sequence without reset: nothing in common
    ]
    with torch.no_grad():
        for tokens in sequences:
            got = drafter.block_logits(torch.tensor(tokens), k)
            hidden = reference_block(drafter, tokens[:-1], [tokens[-1], "M", "M", "M", "S"])
            slots = torch.arange(1, k + 1) - int(shift)
            torch.testing.assert_close(got, drafter.logits(hidden[slots]).float(), rtol=1e-5, atol=1e-5)
            assert drafter.cache.get_seq_length() == len(tokens) - 1 and drafter.cached == tokens[:-1]


def test_training_groups_see_what_decoding_sees():
    """Each group of the one training forward (prefix rows, then blocks with padding rows and a partly masked block)
    equals the dense reference of its own prefix and block."""
    model = tiny_llama(layers=2, seed=1)
    drafter = deer(model, noise=0.05)
    ids = torch.tensor([[5, 9, 40, 7, 11, 12, 13, 14, 15], [3, 4, 8, 20, 21, 22, 2, 2, 2]])
    inside = torch.tensor([[1] * 9, [1] * 6 + [0] * 3]).bool()
    masked = torch.tensor([[[1, 1, 1, 0], [1, 0, 1, 0]], [[1, 1, 0, 0], [0, 0, 0, 0]]]).bool()
    groups = Groups(
        cuts=torch.tensor([[4, 2], [3, 0]]),  # row 1 has one group only
        lengths=torch.tensor([[3, 4], [2, 0]]),
        masked=masked,
        weights=masked.float(),
    )
    embeds, visible, positions = drafter.group_layout(ids, inside, groups)
    with torch.no_grad():
        hidden = drafter.hidden(embeds, visible, positions)
    size = groups.span + 2
    for row, group in [(0, 0), (0, 1), (1, 0)]:
        cut, length = int(groups.cuts[row, group]), int(groups.lengths[row, group])
        slots = ["M" if masked[row, group, j] else int(ids[row, cut + j]) for j in range(length)]
        with torch.no_grad():
            expected = reference_block(drafter, ids[row, : cut - 1].tolist(), [int(ids[row, cut - 1]), *slots, "S"])
        start = ids.shape[1] + group * size
        torch.testing.assert_close(hidden[row, start : start + length + 2], expected, rtol=1e-5, atol=1e-5)


def hand_loss(drafter: DeerDrafter, ids: torch.Tensor, written: torch.Tensor, groups: Groups, reveal=None):
    """The stage loss by hand: per group a separate forward, CE at the masked target-written slots times their
    weight, summed, over the number of target-written slots; and per draft position the masked slots counted."""
    total, counted, counts = torch.tensor(0.0), 0, [0] * drafter.config.block_size
    for row in range(ids.shape[0]):
        for group in range(groups.cuts.shape[1]):
            cut, length = int(groups.cuts[row, group]), int(groups.lengths[row, group])
            if cut == 0:
                continue
            slots = ["M" if groups.masked[row, group, j] else int(ids[row, cut + j]) for j in range(length)]
            prefix, block = ids[row, : cut - 1].tolist(), [int(ids[row, cut - 1]), *slots, "S"]
            if reveal is None:
                hidden = reference_block(drafter, prefix, block)
            else:  # stage 0: a block row sees earlier block rows and the revealed later ones
                embed = drafter.lm.get_input_embeddings().weight
                special = {"M": drafter.mask_embed, "S": drafter.separator_embed}
                rows = [embed[t] for t in prefix] + [special[t] if isinstance(t, str) else embed[t] for t in block]
                n, m = len(prefix), len(block)
                visible = torch.zeros(n + m, n + m, dtype=torch.bool)
                for i in range(n + m):
                    for j in range(n + m):
                        if i < n:
                            visible[i, j] = j <= i
                        else:
                            visible[i, j] = j < n or j <= i or bool(reveal[row, group, i - n, j - n])
                hidden = drafter.lm.model(
                    inputs_embeds=torch.stack(rows)[None],
                    attention_mask=visible[None, None],
                    position_ids=torch.arange(n + m)[None],
                ).last_hidden_state[0, n:]
            for j in range(length):
                if not written[row, cut + j]:
                    continue
                counted += 1
                if groups.masked[row, group, j]:
                    logits = drafter.logits(hidden[j]).float()  # shift: slot j + 1 is read at block row j
                    label = ids[row, cut + j]
                    total = total + groups.weights[row, group, j] * (torch.logsumexp(logits, 0) - logits[label])
                    counts[j] += 1
    return total / counted, counts


@pytest.mark.parametrize("stage", ["continue", "scribe", "adapt"])
def test_stage_losses_match_hand_computations(stage):
    model = tiny_llama(layers=2, seed=1)
    drafter = deer(model, noise=0.05, stage=stage, scribe_alpha=1.5, mask_rate_min=0.5, scribe_max=4)
    ids = torch.tensor([[5, 9, 40, 7, 11, 12, 13, 14, 15], [3, 4, 8, 20, 21, 22, 2, 2, 2]])
    inside = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    written = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": inside, "loss_mask": written}
    drafter.adapt_batches.fill_(500)  # stage 0 halfway through its anneal_steps=1000
    groups = drafter.sample_groups(batch, torch.Generator().manual_seed(3))

    # the draws follow the stage: cuts at target-written tokens, lengths within the block and the sequence
    cuts, lengths = groups.cuts, groups.lengths
    for row, group in (cuts > 0).nonzero().tolist():
        cut, length = int(cuts[row, group]), int(lengths[row, group])
        assert written[row, cut] and 1 <= length <= min(4, int(inside[row].sum()) - cut)
    used = torch.arange(1, 5) <= lengths[..., None]
    if stage == "scribe":  # every slot masked, slot i weighted alpha ** (R - i)
        assert torch.equal(groups.masked, used)
        expected = torch.where(used, 1.5 ** (lengths[..., None] - torch.arange(1, 5)).float(), torch.tensor(0.0))
        torch.testing.assert_close(groups.weights, expected)
    else:  # masked at rate t in [0.5, 1] per group, weighted 1 / t
        rate = 1.0 / groups.weights.amax(-1)[groups.masked.any(-1)]
        assert rate.numel() and ((rate >= 0.5) & (rate <= 1.0)).all() and (groups.masked <= used).all()
        assert torch.equal(groups.weights > 0, groups.masked)
    if stage == "adapt":
        assert 0.35 < groups.reveal.float().mean() < 0.65  # half of the later block rows revealed at step 500 / 1000
    else:
        assert groups.reveal is None

    out = drafter.group_loss(batch, groups)
    with torch.no_grad():
        expected_loss, counts = hand_loss(drafter, ids, written.bool(), groups, groups.reveal)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert out.counts.tolist() == [float(c) for c in counts] and out.hits.shape == (4, drafter.config.topk)
    assert float(out.hits.sum()) <= sum(counts)

    drafter.train()
    before = int(drafter.adapt_batches)
    drafter.loss(batch, {}).loss.backward()
    assert int(drafter.adapt_batches) == before + (stage == "adapt")  # the anneal counts training batches only
    assert drafter.mask_embed.grad is not None and drafter.lm.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_validation_draws_the_same_blocks_every_time():
    drafter = deer(tiny_llama(layers=2), mask_rate_min=0.3)
    batch = {
        "input_ids": torch.arange(3, 23).view(2, 10),
        "attention_mask": torch.ones(2, 10, dtype=torch.long),
        "loss_mask": torch.ones(2, 10, dtype=torch.long),
    }
    first, second = drafter.loss(batch, {}), drafter.loss(batch, {})
    assert torch.equal(first.loss, second.loss) and torch.equal(first.counts, second.counts)


OPTIONS = {
    "one step": {},
    "path search": {"path_search": True},
    "adaptive length": {"adaptive_length": True, "length_min": 2, "length_step": 2},
    "both": {"path_search": True, "adaptive_length": True, "length_min": 2},
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_greedy_decoding_is_lossless_with_accepts_and_rejects(options):
    model = repetitive_llama(layers=2)
    drafter = deer(model, **OPTIONS[options])
    prompts = [[5], [7, 100, 23, 9, 64, 3, 88, 41, 17]]
    assert_lossless_greedy(model, drafter, prompts, 30)
    steps = SpeculativeDecoder(model, eos_ids=set()).generate(prompts[1], drafter, 30).steps
    assert sum(s.accepted for s in steps) > 0 and sum(s.offered > s.accepted for s in steps) > 0
    if "adaptive_length" in OPTIONS[options]:
        assert drafter.draft_shape()["adaptive_length"] and 2 <= drafter.controller.length <= 4


@pytest.mark.slow  # a thousand sampled generations: about 20 s on 2 cores
def test_sampled_decoding_keeps_the_target_distribution():
    """test_eval_sampling's engine check: the first two tokens drawn 1,000 times against p(x1) p(x2 | x1); each
    drafted position carries the warped distribution it was drawn from. At temperature 4, with noise on the drafter's
    LM head, the first drafted token is accepted at times and rejected at others (as in test_drafters_bigram)."""
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=1, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    drafter = deer(model, num_layers=1, block_size=3)
    head = drafter.lm.lm_head.weight
    with torch.no_grad():
        head.add_(2.0 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    prompt, sampling = [3, 4, 5], SamplingConfig(temperature=4.0)
    assert_two_tokens_follow_the_target(model, drafter, prompt, sampling)


def test_export_loads_without_the_hub_and_drafts_the_same(tmp_path):
    model = tiny_llama(layers=2, seed=1)
    drafter = deer(model, noise=0.05, draft_len=3)
    drafter.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["drafter"]
    assert saved["kind"] == "deer" and saved["architecture"]["num_hidden_layers"] == 2
    assert saved["architecture"]["tie_word_embeddings"] is False
    weights = load_file(tmp_path / "model.safetensors")
    assert {"mask_embed", "separator_embed", "lm.lm_head.weight", "lm.model.embed_tokens.weight"} <= set(weights)
    loaded = Drafter.from_pretrained(tmp_path).eval()  # no target: the architecture is in config.json
    tokens = torch.tensor([5, 9, 40, 7, 11])
    torch.testing.assert_close(loaded.block_logits(tokens, 3), drafter.block_logits(tokens, 3))


def test_drafter_set_changes_an_exports_decoding_options(tmp_path):
    deer(tiny_llama(layers=2, seed=1), draft_len=3).save_pretrained(tmp_path)
    assert not Drafter.from_pretrained(tmp_path).config.path_search
    loaded = Drafter.from_pretrained(tmp_path, settings={"path_search": True, "adaptive_length": True})
    assert loaded.config.path_search and loaded.config.adaptive_length and loaded.config.draft_len == 3
    with pytest.raises(DraftsmithError, match="unknown deer drafter option.*path_serch"):
        Drafter.from_pretrained(tmp_path, settings={"path_serch": True})


def test_drafter_set_is_for_an_export_only(tiny_target):
    from draftsmith.eval.loading import load_drafter

    with pytest.raises(DraftsmithError, match="drafter_set changes an export's settings; drafter=ngram is not one"):
        load_drafter("ngram", tiny_target, settings={"path_search": True})


def test_a_pretrained_diffusion_lm_from_a_folder(tmp_path, monkeypatch):
    model = tiny_llama(layers=2, seed=1)
    pretrained = tiny_llama(layers=3, seed=4)  # tied embeddings, as small Qwen models have
    pretrained.save_pretrained(tmp_path / "dlm")
    drafter = DeerDrafter(DeerConfig(diffusion_lm=str(tmp_path / "dlm"), block_size=4))
    drafter.bind(model)
    drafter.init_weights(str(tmp_path / "dlm"), model)
    assert drafter.lm.config.num_hidden_layers == 3 and drafter.config.mask_token_id is None  # no tokenizer there
    own = drafter.lm.state_dict()
    for name, value in pretrained.state_dict().items():
        torch.testing.assert_close(own[name], value, msg=name)
    torch.testing.assert_close(own["lm_head.weight"], pretrained.get_input_embeddings().weight)  # untied copy
    assert own["lm_head.weight"].data_ptr() != own["model.embed_tokens.weight"].data_ptr()
    assert_lossless_greedy(model, drafter.eval(), [[7, 100, 23, 9]], 12)

    with pytest.raises(DraftsmithError, match="diffusion_lm=.*sets another architecture"):
        drafter.init_weights("target", model)
    with pytest.raises(DraftsmithError, match="vocabulary has 128 tokens, the target's 64"):
        drafter.bind(tiny_llama(vocab_size=64))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DraftsmithError, match="hf download no-such-org/dlm.*local folder as drafter.diffusion_lm"):
        DeerDrafter(DeerConfig(diffusion_lm="no-such-org/dlm")).bind(model)


def test_bad_settings_are_one_line():
    with pytest.raises(DraftsmithError, match="stage='denoise': use one of adapt, continue, scribe"):
        DeerConfig(stage="denoise")
    with pytest.raises(DraftsmithError, match="mask_rate_min=0.0: must lie in"):
        DeerConfig(mask_rate_min=0.0)
    with pytest.raises(DraftsmithError, match="num_layers=5, but the target has only 2 layers"):
        DeerDrafter(DeerConfig(num_layers=5)).bind(tiny_llama(layers=2))


def test_one_forward_of_the_drafter_per_proposal():
    """One denoising step drafts the whole block: one call of the drafter's LM per proposal."""
    model = tiny_llama(layers=2, seed=1)
    drafter = deer(model, draft_len=4)
    calls = []
    hook = drafter.lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        steps = SpeculativeDecoder(model, eos_ids=set()).generate([5, 9, 40], drafter, 10).steps
    finally:
        hook.remove()
    assert len(calls) == len(steps) and len(steps) < 10


def test_the_summary_reports_the_longest_accepted_block():
    from draftsmith.eval.summary import summarize

    row = {"category": "code", "turns": ["x"], "lossless": True, "new_tokens": 12, "wall_time": 1.0}
    rows = [
        {**row, "accept_lengths": [4, 1, 2], "accepted": [3, 0, 1], "offered": [8, 8, 8]},
        {**row, "accept_lengths": [8, 1], "accepted": [7, 0], "offered": [8, 8]},
    ]
    rows = [{**r, "plain_new_tokens": 12, "plain_wall_time": 2.0} for r in rows]
    summary = summarize(rows, "deer", "tiny", {})
    assert summary["longest_accepted"] == 7 and summary["by_category"]["code"]["longest_accepted"] == 7


def test_drafter_deer_by_name_is_the_untrained_copy_of_the_first_layers():
    model = tiny_llama(layers=5, seed=1)
    drafter = DeerDrafter.for_target(Target(model=model, tokenizer=None, identity=None))
    assert drafter.lm.config.num_hidden_layers == 4  # the default num_layers
    own, target = drafter.lm.state_dict(), model.state_dict()
    for name in ("model.layers.3.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(own[name], target[name], rtol=0, atol=0)
    assert_lossless_greedy(model, drafter, [[7, 100, 23, 9]], 12)


def test_diffuspec_lattice_proxy_search_and_length_by_hand():
    from math import log

    from draftsmith.drafters.diffuspec import LengthController, NgramProxy, lattice, path_search

    probs = torch.tensor(
        [
            [0.50, 0.40, 0.10, 0.00, 0.00],  # 0.8 reached after two candidates
            [0.90, 0.05, 0.05, 0.00, 0.00],  # one candidate carries 0.8
            [0.30, 0.22, 0.20, 0.18, 0.10],  # width 3 stops before 0.8
            [0.12, 0.11, 0.10, 0.07, 0.60],  # the first position whose most likely token is EOS (4): kept, the rest cut
            [1.00, 0.00, 0.00, 0.00, 0.00],
        ]
    )
    positions = lattice(probs, mass=0.8, width=3, eos_ids={4})
    assert [[t for t, _ in p] for p in positions] == [[0, 1], [0], [0, 1, 2], [4, 0, 1]]
    assert positions[0][1][1] == pytest.approx(log(0.4))

    proxy = NgramProxy(order=2, vocab=5, prior=1.0)
    proxy.update([1, 0, 1, 0, 1])  # bigrams 1->0 twice, 0->1 twice; unigrams 1 x3, 0 x2
    unigram = (3 + 1 / 5) / (5 + 1)
    assert proxy.log_prob([7], 1) == pytest.approx(log(unigram))  # unseen history: the unigram
    assert proxy.log_prob([0], 1) == pytest.approx(log((2 + unigram) / (2 + 1)))
    proxy.update([1, 0, 1, 0, 1, 1])  # extends what was counted
    assert proxy.totals[1][(1,)] == 3
    proxy.update([2, 2])  # another sequence: counted anew
    assert proxy.totals[0][()] == 2

    # the per-position argmax reads 0 0 0 but the proxy, having seen only 1 after 0, prefers 0 1 ...
    proxy.update([0, 1, 0, 1, 0])
    path = path_search(positions[:3], proxy, [0, 1, 0], beam=3, weight=0.2, eos_ids={4})
    assert path[:2] == [1, 0] and len(path) == 3
    greedy_like = path_search(positions[:3], proxy, [0, 1, 0], beam=3, weight=1.0, eos_ids={4})
    assert greedy_like == [0, 0, 0]  # weight 1: the drafter's log-probabilities alone
    assert path_search(positions, proxy, [0], beam=2, weight=1.0, eos_ids={4})[-1] == 4  # EOS only at the end

    controller = LengthController(low=4, high=12, step=4, rho=0.5)
    assert controller.update(drafted=4, accepted=4) == 8  # accepted whole: grow by step
    assert controller.update(drafted=8, accepted=1) == 6  # else follow the drafted EMA (4 + 8) / 2
    assert controller.update(drafted=2, accepted=0) == 4  # clipped at low
