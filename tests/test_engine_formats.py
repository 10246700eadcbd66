"""Engine checkpoint forms: EAGLE-3 -> speculators -> draftsmith round trip, the names and fields the engines read,
the aux-layer off-by-one per engine, the SGLang form, and vLLM's Medusa (its head math redone by hand)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, tiny_llama
from safetensors.torch import load_file, save_file

from draftsmith.drafters.base import DecodeState
from draftsmith.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from draftsmith.drafters.engine_formats import (
    is_speculators_checkpoint,
    load_speculators,
    write_sglang_eagle3,
    write_speculators,
    write_vllm_medusa,
)
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET_LAYERS = 4
FEATURES = [1, 2, 3]
LAYER = [  # transformers' Llama decoder-layer names; the EAGLE-3 first layer adds hidden_norm
    "input_layernorm.weight",
    "hidden_norm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]
# speculators 0.9.0 models/eagle3/core.py (Eagle3DraftModel: fc, layers = [LlamaDecoderEagle3FirstLayer of
# models/eagle3/model_definitions.py], norm, lm_head), confirmed by running its save_pretrained by hand; it also
# saves embed_tokens.weight, which it reloads from the verifier when absent (_keys_to_ignore_on_load_missing).
SPECULATORS_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", *(f"layers.0.{k}" for k in LAYER)}
# SGLang python/sglang/srt/models/llama_eagle3.py (LlamaModel.fc / .midlayer / .norm, LlamaForCausalLMEagle3.lm_head)
SGLANG_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", *(f"midlayer.{k}" for k in LAYER)}
# config.json of speculators 0.9.0's Eagle3SpeculatorConfig.save_pretrained (run by hand), less auto_map (it names
# the config.py speculators copies beside it, which no engine needs) and transformers_version (the writer's runtime).
SPECULATORS_CONFIG = {
    "architectures",
    "draft_vocab_size",
    "dtype",
    "eagle_aux_hidden_state_layer_ids",
    "embed_requires_grad",
    "fc_norm",
    "norm_before_fc",
    "norm_before_residual",
    "norm_output",
    "speculators_config",
    "speculators_model_type",
    "speculators_version",
    "target_hidden_size",
    "tie_word_embeddings",
    "transformer_layer_config",
}
# transformer_layer_config as speculators writes it: LlamaConfig(...).to_diff_dict() under transformers 5.19
LAYER_CONFIG = {
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "mlp_bias",
    "model_type",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "pad_token_id",
    "pretraining_tp",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "use_cache",
    "vocab_size",
}


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=TARGET_LAYERS, seed=5)


def eagle(model, **overrides) -> Eagle3Drafter:
    """A bound EAGLE-3 drafter with random (not initial) weights, so every tensor matters."""
    torch.manual_seed(7)
    settings = {"feature_layers": FEATURES, "tree_nodes": 8, "tree_depth": 3, "tree_topk": 3}
    drafter = Eagle3Drafter(Eagle3Config(**{**settings, **overrides}))
    drafter.bind(model)
    perturb(drafter, 0.2)
    return drafter.eval()


def hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_speculators_round_trip_gives_the_same_drafter(target, tmp_path) -> None:
    drafter = eagle(target)
    write_speculators(drafter, tmp_path, "org/tiny-target", target.config)
    loaded = load_speculators(tmp_path, target)
    before, after = drafter.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name in ("feature_layers", "dim", "attention_heads", "kv_heads", "ffn_size", "rope_base", "rms_eps"):
        assert getattr(loaded.config, name) == getattr(drafter.config, name), name
    assert loaded.config.ttt_steps == drafter.config.ttt_steps
    loaded.set_draft_size(drafter.config.tree_nodes)
    loaded.config.tree_depth, loaded.config.tree_topk = drafter.config.tree_depth, drafter.config.tree_topk
    ids = torch.randint(3, 128, (1, 12))
    hidden = hidden_states(target, ids)
    for length, new_from in ((8, 0), (12, 6)):  # a second call extends each drafter's own cache
        features = {layer: hidden[layer][0, : length - 1] for layer in FEATURES}
        state = DecodeState(tokens=ids[0, :length], prompt_len=4, hidden=features, new_from=new_from)
        ours, theirs = drafter.propose(state), loaded.propose(state)
        assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.parents, theirs.parents)


def test_speculators_names_and_fields_are_what_speculators_and_vllm_read(target, tmp_path) -> None:
    drafter = eagle(target)
    loaded_config = copy.deepcopy(target.config)
    loaded_config.architectures = ["LlamaForCausalLM"]  # as from_pretrained leaves it (a fresh model has none)
    write_speculators(drafter, tmp_path, "org/tiny-target", loaded_config)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == SPECULATORS_KEYS
    config = config_of(tmp_path)
    assert set(config) == SPECULATORS_CONFIG and set(config["transformer_layer_config"]) == LAYER_CONFIG
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["head_dim"] == 8
    assert layer["rope_parameters"] == {"rope_theta": drafter.config.rope_base, "rope_type": "default"}
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3DraftModel"]
    assert config["draft_vocab_size"] == layer["vocab_size"] == 128  # full vocabulary: no d2t / t2d
    # vLLM transformers_utils/configs/speculators/algos.py defaults norm_before_residual to true if absent
    assert config["norm_before_residual"] is False and not config["fc_norm"] and not config["norm_before_fc"]
    spec = config["speculators_config"]  # vLLM speculators/base.py validate_speculators_config reads these
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == drafter.config.ttt_steps
    assert spec["verifier"] == {"architectures": ["LlamaForCausalLM"], "name_or_path": "org/tiny-target"}
    assert config["eagle_aux_hidden_state_layer_ids"] == FEATURES  # vLLM / speculators ids = draftsmith's indices


def test_each_engines_layer_ids_pick_draftsmiths_hidden_states(target) -> None:
    """vLLM (llama.py) takes id i *entering* layer i; SGLang (llama.py) takes id k entering layer k + 1 (its
    set_eagle3_layers_to_capture adds 1). Both, replayed with hooks, give transformers' hidden_states[index]."""
    ids = torch.randint(3, 128, (1, 7))
    entering: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, kwargs) -> None:
            entering[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    hooks = [
        layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(target.model.layers)
    ]
    try:
        hidden = hidden_states(target, ids)
    finally:
        for hook in hooks:
            hook.remove()
    for index in FEATURES:
        vllm_id, sglang_id = index, index - 1  # what write_speculators / write_sglang_eagle3 record
        torch.testing.assert_close(entering[vllm_id], hidden[index])
        torch.testing.assert_close(entering[sglang_id + 1], hidden[index])


def test_sglang_form(target, tmp_path) -> None:
    drafter = eagle(target)
    write_sglang_eagle3(drafter, tmp_path, target.config)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == SGLANG_KEYS
    assert torch.equal(tensors["midlayer.self_attn.q_proj.weight"], drafter.backbone.midlayer.self_attn.q_proj.weight)
    config = config_of(tmp_path)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 128
    assert config["rope_theta"] == drafter.config.rope_base and config["tie_word_embeddings"] is False
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    deeper = tiny_llama(layers=8, seed=5)
    default = eagle(deeper, feature_layers=None)  # [2, 4, 5]: both engines' default, which needs no ids
    write_sglang_eagle3(default, tmp_path / "default", deeper.config)
    assert "eagle_aux_hidden_state_layer_ids" not in config_of(tmp_path / "default")["eagle_config"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"feature_layers": [0, 1, 2]}, "between 1 and 3"),
        ({"feature_layers": [1, 2, 4]}, "between 1 and 3"),
        ({"feature_layers": [1, 3]}, "exactly 3"),
        ({"dim": 16}, "dim=16"),
    ],
)
def test_writers_refuse_what_engines_cannot_serve(target, tmp_path, overrides, message) -> None:
    if "dim" in overrides:  # a narrower drafter cannot start its LM head from the target's, so is built unbound
        sizes = {"hidden_size": 32, "vocab_size": 128, "target_layers": TARGET_LAYERS, "ffn_size": 64}
        drafter = Eagle3Drafter(
            Eagle3Config(feature_layers=FEATURES, attention_heads=4, kv_heads=2, **sizes, **overrides)
        )
    else:
        drafter = eagle(target, **overrides)
    for write in (
        lambda: write_speculators(drafter, tmp_path, "t", target.config),
        lambda: write_sglang_eagle3(drafter, tmp_path, target.config),
    ):
        with pytest.raises(DraftsmithError, match=message):
            write()


@pytest.fixture()
def written(target, tmp_path) -> Path:
    write_speculators(eagle(target), tmp_path / "spec", "org/tiny-target", target.config)
    return tmp_path / "spec"


def edit_config(folder: Path, change) -> None:
    config = config_of(folder)
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(norm_before_residual=True), "norm_before_residual=true"),
        (lambda c: c.update(fc_norm=True), "fc_norm=true"),
        (lambda c: c.update(draft_vocab_size=64), "truncated draft vocabulary"),
        (lambda c: c["transformer_layer_config"].update(model_type="qwen3"), "'qwen3' layer"),
        (lambda c: c["transformer_layer_config"].update(num_hidden_layers=2), "2 draft layers"),
        (lambda c: c["transformer_layer_config"].update(rope_parameters={"rope_type": "llama3"}), "scaled RoPE"),
        (lambda c: c["transformer_layer_config"].update(rms_norm_eps=1e-3), "rms_norm_eps"),
        (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 2, 4]), "outside 0..3"),
        (lambda c: c.update(speculators_model_type="dflash"), "'dflash'"),
        (lambda c: c.pop("transformer_layer_config"), "not a speculators eagle3 config"),
    ],
)
def test_load_refuses_configs_the_backbone_cannot_represent(target, written, change, message) -> None:
    edit_config(written, change)
    with pytest.raises(DraftsmithError, match=message) as caught:
        load_speculators(written, target)
    assert str(written / "config.json") in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({"fc_norm.0.weight": torch.ones(32)}), "no place for: fc_norm.0.weight"),
        (lambda t: t.pop("layers.0.hidden_norm.weight"), "missing: layers.0.hidden_norm.weight"),
        (lambda t: t.update(d2t=torch.arange(128)), "token map"),
        (lambda t: t.update({"embed_tokens.weight": torch.zeros(128, 32)}), "trained embeddings"),
    ],
)
def test_load_refuses_weights_the_backbone_cannot_represent(target, written, change, message) -> None:
    path = written / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    with pytest.raises(DraftsmithError, match=message) as caught:
        load_speculators(written, target)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_load_takes_the_targets_embeddings_and_head_when_the_file_has_them_or_not(target, written) -> None:
    path = written / "model.safetensors"
    tensors = load_file(str(path))
    tensors["embed_tokens.weight"] = target.get_input_embeddings().weight.clone()  # as speculators saves it
    del tensors["lm_head.weight"]
    save_file(tensors, str(path))
    drafter = load_speculators(written, target)
    assert torch.equal(drafter.backbone.lm_head.weight, target.lm_head.weight)
    assert bool(drafter.backbone.lm_head_initialised)


def test_is_speculators_checkpoint(target, written, tmp_path) -> None:
    assert is_speculators_checkpoint(written)
    eagle(target).save_pretrained(tmp_path / "draftsmith")
    assert not is_speculators_checkpoint(tmp_path / "draftsmith")
    assert not is_speculators_checkpoint(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_speculators_checkpoint(tmp_path / "broken")


def medusa(model, **overrides) -> MedusaDrafter:
    torch.manual_seed(3)
    drafter = MedusaDrafter(MedusaConfig(**{"num_heads": 3, "num_layers": 2, **overrides}))
    drafter.bind(model)
    perturb(drafter, 0.3)
    return drafter.eval()


def vllm_medusa_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """vLLM models/medusa.py by hand: per head, x + SiLU(W x + b) for each layer, then that head's lm_head."""
    config, tensors = config_of(folder), load_file(str(folder / "model.safetensors"))
    out = []
    for i in range(config["num_heads"]):
        h = x
        for j in range(config["num_hidden_layers"]):
            h = h + F.silu(
                F.linear(h, tensors[f"blocks.{i}.layers.{j}.weight"], tensors[f"blocks.{i}.layers.{j}.bias"])
            )
        head = tensors["lm_heads.0.weight" if config["original_lm_head"] else f"lm_heads.{i}.weight"]
        out.append(F.linear(h, head))
    return torch.stack(out)


@pytest.mark.parametrize(("share", "one"), [(True, False), (True, True), (False, False)])
def test_vllm_medusa_reproduces_the_heads(tmp_path, share, one) -> None:
    model = tiny_llama(seed=1)
    drafter = medusa(model, share_lm_head=share)
    write_vllm_medusa(drafter, tmp_path, model, one_lm_head=one)
    config, tensors = config_of(tmp_path), load_file(str(tmp_path / "model.safetensors"))
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert (config["num_heads"], config["num_hidden_layers"], config["hidden_size"]) == (3, 2, 32)
    assert config["vocab_size"] == config["truncated_vocab_size"] == 128 and config["medusa_fc_bias"] is True
    assert config["original_lm_head"] is (share and one)
    heads = 1 if share and one else 3
    blocks = {f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    assert set(tensors) == blocks | {f"lm_heads.{i}.weight" for i in range(heads)}
    assert tensors["blocks.2.layers.1.weight"].shape == (32, 32) and tensors["lm_heads.0.weight"].shape == (128, 32)
    x = torch.randn(5, 32)  # five positions' last hidden states; every head reads each
    with torch.no_grad():
        expected = torch.stack([drafter.heads.head_logits(k, x, model.lm_head.weight) for k in range(3)])
    torch.testing.assert_close(vllm_medusa_logits(tmp_path, x), expected)


def test_vllm_medusa_refuses_a_biased_lm_head(tmp_path) -> None:
    model = tiny_llama(seed=1)
    drafter = medusa(model)
    model.lm_head = torch.nn.Linear(32, 128, bias=True)
    with pytest.raises(DraftsmithError, match="bias"):
        write_vllm_medusa(drafter, tmp_path, model)


def test_engine_forms_per_kind_and_refusals() -> None:
    from draftsmith.drafters.amphista import AmphistaConfig
    from draftsmith.drafters.engine_formats import engine_forms

    assert engine_forms(Eagle3Config(), ["auto"]) == ["speculators", "sglang"]
    assert engine_forms(MedusaConfig(), ["auto"]) == ["vllm"] and engine_forms(MedusaConfig(), []) == []
    assert engine_forms(MedusaConfig(lora_rank=8), ["auto"]) == []  # Medusa-2: an engine would serve the base target
    with pytest.raises(DraftsmithError, match="amphista drafter has no vllm form"):
        engine_forms(AmphistaConfig(), ["vllm"])
