"""Medusa-2: LoRA on the target through peft, trained with the heads plus a self-distillation KL; the export
carries the adapter and the evaluator merges it, so it verifies with the adapted target."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from huggingface_hub.utils import filter_repo_objects
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_training_resume import KillAtStep, Killed
from test_training_support import settings, tiny_drafter, tiny_fit, tiny_rows, tiny_target

import draftsmith.eval.drift
from draftsmith.drafters.errors import DraftsmithError, one_line_errors
from draftsmith.drafters.medusa import MedusaConfig
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.target import Target
from draftsmith.eval.engine import SpeculativeDecoder
from draftsmith.eval.loading import adapt_target, carries_adapter, load_drafter
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions
from draftsmith.eval.testing import assert_lossless_greedy
from draftsmith.training.callbacks import AcceptanceEval
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.export import Exporter
from draftsmith.training.features import CachedFeatures
from draftsmith.training.lora import self_distillation_kl
from draftsmith.training.module import DrafterModule
from draftsmith.training.pipeline import check_adapted_target, finish, run

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}
REPO = Path(__file__).resolve().parents[1]


def adapters(module: DrafterModule) -> dict[str, torch.Tensor]:
    return {name: param for name, param in module.target.named_parameters() if param.requires_grad}


def medusa2_module(**fields) -> DrafterModule:
    target = tiny_target()
    return DrafterModule(tiny_drafter(target, "medusa", **LORA, **fields), target.model, settings())


def first_batch(rows: int = 8) -> dict[str, torch.Tensor]:
    loader = DistillDataModule(tiny_rows(rows), batch_size=4, val_fraction=0.0, max_length=64, pad_id=0)
    return next(iter(loader.train_dataloader()))


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (length,), generator=generator).tolist() for length in (1, 9)]


def test_only_the_adapters_and_the_heads_train(tmp_path):
    module = tiny_fit(tmp_path, settings(max_epochs=1), drafter_fields={**LORA, "lora_lr": 1e-2})
    lora = adapters(module)
    assert lora and all(".lora_A." in name or ".lora_B." in name for name in lora)
    assert any(param.abs().sum() > 0 for name, param in lora.items() if ".lora_B." in name)  # B starts at 0
    base = [param for name, param in module.target.named_parameters() if name not in lora]
    assert base and all(not param.requires_grad and param.grad is None for param in base)

    groups = module.trainer.optimizers[0].param_groups
    optimised = {id(param) for group in groups for param in group["params"]}
    assert optimised == {id(p) for p in module.drafter.parameters()} | {id(p) for p in lora.values()}
    assert [group["initial_lr"] for group in groups] == [3e-3, 3e-3, 1e-2]  # heads: trainer.lr; LoRA: lora_lr

    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert {k for k in saved if k.startswith("target.")} == {"target." + name for name in lora}
    assert "train/kl" in module.trainer.callback_metrics


def test_heads_warmup_trains_the_heads_alone_first(tmp_path):
    seen = []  # per step: the adapters' lr and whether any adapter weight has moved yet

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            moved = any(p.abs().sum() > 0 for name, p in adapters(module).items() if ".lora_B." in name)
            seen.append((trainer.optimizers[0].param_groups[-1]["lr"], moved))

    tiny_fit(tmp_path, settings(max_epochs=2, warmup_steps=2), drafter_fields={**LORA, "heads_warmup_steps": 3},
             callbacks=[Watch()])  # fmt: skip
    lrs, moved = zip(*seen)
    # the lr logged after step s is the one step s+1 uses: steps 1-3 at 0, step 4 starts the adapters' warmup at 0
    assert lrs[:3] == (0.0, 0.0, 0.0) and lrs[3] > 0 and not any(moved[:4]) and moved[-1]
    assert max(lrs) == pytest.approx(3e-3)
    with pytest.raises(DraftsmithError, match="heads_warmup_steps=99 covers the whole run"):
        tiny_fit(tmp_path / "long", settings(max_epochs=1), drafter_fields={**LORA, "heads_warmup_steps": 99})


def test_the_kl_starts_at_zero_and_grows_once_the_adapters_move():
    module = medusa2_module(distill_weight=2.0).train()
    dropouts = [m for name, m in module.target.named_modules() if name.endswith("lora_dropout")]
    assert dropouts and all(m.training for m in dropouts) and not module.target.base_model.model.model.training
    batch = first_batch()
    out = module._step(batch)
    assert out.logs["kl"].item() == 0.0  # LoRA's B is zero: the adapted target is exactly the original
    out.loss.backward()
    lora = adapters(module)
    assert all(param.grad is not None for param in lora.values())
    assert all(param.grad is None for name, param in module.target.named_parameters() if name not in lora)
    torch.optim.SGD(lora.values(), lr=1.0).step()

    module.eval()
    assert not any(m.training for m in dropouts)
    with torch.no_grad():
        out = module._step(batch)
        heads_only = module.drafter.loss(batch, module.features(module.target, batch, module.needs)).loss
    assert out.logs["kl"].item() > 0
    torch.testing.assert_close(out.loss, heads_only + 2.0 * out.logs["kl"])

    # the same KL from full-vocabulary logits of the adapted and the original target
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        adapted = module.target(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        with module.target.disable_adapter():
            original = module.target(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        kl = self_distillation_kl(module.target, batch, adapted.hidden_states[-1])
    terms = [
        F.kl_div(
            F.log_softmax(adapted.logits[b, t], -1), F.log_softmax(original[b, t], -1), log_target=True, reduction="sum"
        )
        for b in range(ids.shape[0])
        for t in range(ids.shape[1] - 1)
        if mask[b, t] and mask[b, t + 1] and loss_mask[b, t + 1]
    ]
    torch.testing.assert_close(kl, torch.stack(terms).mean())


def test_export_carries_the_adapter_and_the_evaluator_verifies_with_the_adapted_target(tmp_path, monkeypatch):
    module = medusa2_module().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in adapters(module).values():
            param.normal_(0.0, 0.3)  # an adapter that clearly changes the target
    trained_model = module.target.base_model.model  # peft put the adapters inside the target model itself
    out = Exporter(tmp_path / "export", tiny_target().identity, {"recipe_name": "tiny"}, module.adapter).write(
        module.drafter, None
    )

    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any("lora" in key for key in load_file(str(out / "model.safetensors")))  # drafter weights only
    assert json.loads((out / "config.json").read_text())["target_adapter"] == "adapter"
    assert "adapted** target" in (out / "README.md").read_text()

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        """The Hub's download of the export as a repo: only the files the patterns select."""
        files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (tmp_path / "hub" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / name, tmp_path / "hub" / name)
        return str(tmp_path / "hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    base = tiny_target()
    served = tiny_target()
    drafter = load_drafter("org/medusa2-tiny", served)  # through the Hub: the adapter comes with the repo
    ids = torch.tensor([prompts()[1]])
    with torch.no_grad():
        expected = trained_model(ids).logits
        torch.testing.assert_close(served.model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert (base.model(ids).logits - expected).abs().max() > 0.1
    assert not any("lora" in name for name, _ in served.model.named_modules())  # merged, plain layers again
    assert served.identity.name.endswith("+ adapter/ of the drafter")  # reports say which model they measured
    assert served.identity.weights_hash == base.identity.weights_hash
    later = tiny_target()  # `python -m eval` decodes with the original target first (drift), then merges
    unmerged = load_drafter("org/medusa2-tiny", later, merge_adapter=False)
    assert carries_adapter(unmerged) and not carries_adapter(load_drafter("ngram", later))
    with torch.no_grad():
        torch.testing.assert_close(later.model(ids).logits, base.model(ids).logits)
        adapt_target(unmerged, later)
        torch.testing.assert_close(later.model(ids).logits, expected, rtol=1e-5, atol=1e-5)

    decoder = SpeculativeDecoder(served.model, eos_ids=set())
    adapted_plain = [decoder.generate(p, PlainDrafter(), 24).tokens for p in prompts()]
    base_plain = [
        SpeculativeDecoder(base.model, eos_ids=set()).generate(p, PlainDrafter(), 24).tokens for p in prompts()
    ]
    assert adapted_plain != base_plain
    steps = decoder.generate(prompts()[1], drafter, 24).steps  # the comparison exercises acceptance and rollback
    assert sum(step.accepted for step in steps) > 0 and any(step.offered > step.accepted for step in steps)
    assert_lossless_greedy(served.model, drafter, prompts(), 24)  # `python -m eval`: the merged adapter
    assert_lossless_greedy(trained_model, module.drafter, prompts(), 24)  # the per-epoch eval: the live adapter


def test_an_export_missing_its_adapter_is_refused_in_one_line(tmp_path):
    module = medusa2_module()
    out = Exporter(tmp_path / "export", tiny_target().identity, {"recipe_name": "tiny"}, module.adapter).write(
        module.drafter, None
    )
    shutil.rmtree(out / "adapter")
    served = tiny_target()
    for merge in (True, False):  # refused at load time, before `python -m eval` decodes with the original
        with pytest.raises(DraftsmithError, match="names the target adapter adapter/, which is missing"):
            load_drafter(str(out), served, merge_adapter=merge)


def test_every_evaluation_measures_the_drift_from_the_original_target(real_target, tmp_path, monkeypatch):
    """The original's answers are decoded once, with the adapters off, and every epoch is compared with them, and
    so is a final export that no epoch evaluated (keep=last, a run ending past its last evaluation)."""
    tiny = tiny_llama(vocab_size=len(real_target.tokenizer))  # the real tokenizer: the questions are text
    target = Target(tiny, real_target.tokenizer, real_target.identity)
    base = Target(copy.deepcopy(tiny), real_target.tokenizer, real_target.identity)
    module = DrafterModule(tiny_drafter(target, "medusa", **LORA), target.model, settings())
    with torch.no_grad():
        for param in adapters(module).values():
            param.normal_(0.0, 0.3)
    decoded_originals = []
    greedy_turns = draftsmith.eval.drift.greedy_turns

    def counting_greedy_turns(*args, **kwargs):
        decoded_originals.append(greedy_turns(*args, **kwargs))
        return decoded_originals[-1]

    monkeypatch.setattr(draftsmith.eval.drift, "greedy_turns", counting_greedy_turns)
    questions = load_questions(DEFAULT_QUESTIONS)[:2]
    exporter = Exporter(tmp_path / "export", target.identity, {}, module.adapter)
    callback = AcceptanceEval(target, questions, exporter, max_new_tokens=4, out=tmp_path / "epochs", keep="last")
    logged = []
    trainer = SimpleNamespace(
        is_global_zero=True,
        current_epoch=0,
        global_step=0,
        loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))],
    )
    for epoch in range(2):
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, module)

    assert len(decoded_originals) == 1 and decoded_originals[0] == greedy_turns(base, questions, 4)
    drift = draftsmith.eval.drift.adapter_drift(
        target.model, decoded_originals[0], [[t.tokens for t in q] for q in greedy_turns(target, questions, 4)]
    )
    assert drift["top1_agreement"] < 1.0  # the adapters were on for the comparison, and are on again after it
    for metrics in logged:
        assert metrics["drift/top1_agreement"] == pytest.approx(drift["top1_agreement"])
        assert metrics["drift/identical_answers"] == pytest.approx(drift["identical_answers"])
    assert "LoRA-adapted (Medusa-2)" in (tmp_path / "export" / "README.md").read_text()

    cfg = OmegaConf.create({"recipe_name": "tiny", "publish": {"repo_id": None}})
    summary = finish(cfg, tmp_path, target, module, callback, exporter, zero3=False, final_step=7)
    assert summary["adapter_drift"] == pytest.approx(drift) and len(decoded_originals) == 1
    exported = json.loads((tmp_path / "export" / "eval" / "summary.json").read_text())
    assert exported["adapter_drift"] == pytest.approx(drift)


def test_feature_cache_zero3_and_borrowed_modules_are_refused(tmp_path, capsys):
    target = tiny_target()
    with pytest.raises(DraftsmithError, match="trainer.features=online"):
        DrafterModule(tiny_drafter(target, **LORA), target.model, settings(), CachedFeatures(cache=None))
    medusa2, medusa1 = tiny_drafter(target, **LORA).config, tiny_drafter(target).config
    with pytest.raises(DraftsmithError, match="trainer.features=online"):
        check_adapted_target(medusa2, settings(features="cache"), zero3=False)
    with pytest.raises(DraftsmithError, match="ZeRO-3"):
        check_adapted_target(medusa2, settings(), zero3=True)
    check_adapted_target(medusa1, settings(features="cache"), zero3=True)
    with pytest.raises(DraftsmithError, match="heads_warmup_steps=-1: give a count >= 0"):
        MedusaConfig(lora_rank=4, heads_warmup_steps=-1)
    with pytest.raises(DraftsmithError, match="lm_head: the heads borrow it"):
        MedusaConfig(lora_rank=4, lora_target_modules=["q_proj", "lm_head"])

    with initialize_config_dir(version_base=None, config_dir=str(REPO / "recipes")):
        cfg = compose("config", overrides=["recipe=medusa2_smollm2", "trainer.features=cache", f"out={tmp_path}"])
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        run(cfg)  # refused before the target is loaded
    assert stopped.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the drafter adapts the target with LoRA")


def test_resumed_run_keeps_the_adapters(tmp_path):
    train = settings(max_epochs=2, checkpoint_every_n_steps=3)
    reference = tiny_fit(tmp_path / "full", train, drafter_fields=LORA)
    with pytest.raises(Killed):
        tiny_fit(tmp_path / "killed", train, drafter_fields=LORA, callbacks=[KillAtStep(7)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed = tiny_fit(tmp_path / "killed", train, drafter_fields=LORA, ckpt_path=last)
    assert resumed.trainer.global_step == reference.trainer.global_step
    expected, got = adapters(reference), adapters(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    for name, tensor in reference.drafter.state_dict().items():
        torch.testing.assert_close(resumed.drafter.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
