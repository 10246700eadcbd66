"""The bigram test drafter (drafters/bigram.py): its loss by hand, training without a single target forward,
lossless greedy and sampled decoding, and the ordinary `python train.py` -> export -> `load_drafter` path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from test_eval_sampling import VOCAB, assert_two_tokens_follow_the_target
from test_training_e2e import PROMPTS, TINY, _train
from test_training_support import make_trainer, settings, tiny_rows

from draftsmith.drafters.bigram import TOPK, BigramConfig, BigramDrafter
from draftsmith.drafters.sampling import SamplingConfig
from draftsmith.drafters.target import load_target
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.loading import load_drafter
from draftsmith.eval.testing import assert_lossless_greedy
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.module import DrafterModule, frozen_target_expected

pytestmark = pytest.mark.usefixtures("one_thread")


def bigram(model: torch.nn.Module, draft_len: int = 4, scale: float = 1.0, noise: float = 0.0) -> BigramDrafter:
    """A bigram drafter bound to ``model`` with W = ``scale`` x identity + Gaussian ``noise`` (fresh: identity)."""
    drafter = BigramDrafter(BigramConfig(draft_len=draft_len))
    drafter.bind(model)
    w = drafter.mix.weight
    with torch.no_grad():
        w.copy_(
            scale * torch.eye(w.shape[0]) + noise * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
        )
    return drafter.eval()


def test_loss_is_next_token_cross_entropy_on_target_written_tokens():
    model = tiny_llama()
    drafter = bigram(model, noise=0.2)
    batch = {
        "input_ids": torch.tensor([[5, 9, 9, 40, 7, 2], [3, 11, 12, 13, 14, 15]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]]),
    }
    out = drafter.loss(batch, {})
    embed, head, w = model.get_input_embeddings().weight, model.lm_head.weight, drafter.mix.weight.detach()
    losses, hits = [], [0] * TOPK
    for ids, inside, written in zip(*(batch[k].tolist() for k in ("input_ids", "attention_mask", "loss_mask"))):
        for t in range(len(ids) - 1):
            if inside[t] and inside[t + 1] and written[t + 1]:
                logits = head @ (w @ embed[ids[t]])
                losses.append(torch.logsumexp(logits, 0) - logits[ids[t + 1]])
                rank = int((logits > logits[ids[t + 1]]).sum())
                if rank < TOPK:
                    hits[rank] += 1
    assert len(losses) == 3 + 4
    torch.testing.assert_close(out.loss, torch.stack(losses).mean())
    assert out.counts.tolist() == [7.0] and out.hits.tolist() == [[float(h) for h in hits]] and sum(hits) > 0
    out.loss.backward()
    assert drafter.mix.weight.grad.abs().sum() > 0

    nothing = drafter.loss({**batch, "loss_mask": torch.zeros_like(batch["loss_mask"])}, {})
    assert nothing.loss.item() == 0.0 and nothing.loss.requires_grad and nothing.counts.tolist() == [0.0]


def test_training_never_runs_the_target_forward(tmp_path):
    model = tiny_llama()
    drafter = bigram(model)
    assert not drafter.target_needs().any
    train_settings = settings(max_epochs=1, warmup_steps=0)
    module = DrafterModule(drafter, model, train_settings)
    rows = DistillDataModule(tiny_rows(), batch_size=4, val_fraction=0.2, max_length=64, pad_id=0, sort_chunk=2)
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with frozen_target_expected():
            make_trainer(tmp_path, train_settings).fit(module, datamodule=rows)
    finally:
        hook.remove()
    assert module.trainer.global_step > 0 and forwards == []
    assert not torch.equal(drafter.mix.weight, torch.eye(32))  # it trained
    assert set(drafter.state_dict()) == {"mix.weight"}  # the borrowed embeddings and LM head stay out


def test_greedy_decoding_is_lossless_with_accepts_and_rejects():
    model = tiny_llama(layers=2, seed=3)
    with torch.no_grad():  # as in test_drafters_lossless: greedy output with repeats (accepted) and variety
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10.0)
    drafter = bigram(model)
    prompts = [[5], [7, 100, 23, 9, 64, 3, 88, 41, 17]]
    assert_lossless_greedy(model, drafter, prompts, 30)
    steps = SpeculativeDecoder(model, eos_ids=set()).generate(prompts[1], drafter, 30).steps
    assert sum(s.accepted for s in steps) > 0 and sum(s.offered > s.accepted for s in steps) > 0


def test_sampled_decoding_keeps_the_target_distribution():
    """test_eval_sampling's engine check with the bigram drafter: its chains carry the q they were drawn from.

    At temperature 4 (flatter p and q than test_eval_sampling's) 1,000 draws catch a drafter that reports the q of
    another temperature (p = 6e-53) or argmax tokens under a sampled q (p = 1e-10)."""
    model = tiny_llama(vocab_size=VOCAB, hidden=16, layers=1, seed=2)
    model.lm_head.weight = torch.nn.Parameter(
        1.5 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(2)), requires_grad=False
    )
    # W ~ 50 x identity undoes the embeddings' 0.02 scale as the target's final norm does, so q is near p; the noise
    # keeps it off: the first drafted token is accepted at times and rejected at others.
    drafter = bigram(model, draft_len=3, scale=50.0, noise=25.0)
    prompt, sampling = [3, 4, 5], SamplingConfig(temperature=4.0)
    assert_two_tokens_follow_the_target(model, drafter, prompt, sampling)


def test_train_py_exports_a_bigram_that_loads_and_decodes_losslessly(tmp_path, tiny_target):
    """The ordinary command on a saved copy of tiny_target (a random 2-layer Llama with the real tokenizer)."""
    folder = tmp_path / "target"
    tiny_target.model.save_pretrained(folder)
    tiny_target.tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    target_spec = {"name": "tiny-bigram", "source": str(folder), "gguf_package": None, "gguf_file": None}
    done = _train(
        "recipe=bigram_smollm2",
        *(f"target.{key}={'null' if value is None else value}" for key, value in target_spec.items()),
        f"out={tmp_path / 'run'}",
        f"data.out={tmp_path / 'data'}",
        f"data.prompts={prompts}",
        *TINY,
        "trainer.warmup_steps=0",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    export = tmp_path / "run" / "export"
    assert set(load_file(export / "model.safetensors")) == {"mix.weight"}

    target = load_target(target_spec)
    drafter = load_drafter(export, target)
    assert isinstance(drafter, BigramDrafter) and drafter.config.hidden_size == 32
    assert not torch.equal(drafter.mix.weight, torch.eye(32))  # the export holds the trained W
    prompt_ids = [target.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    assert_lossless_greedy(target.model, drafter, prompt_ids, 24)
