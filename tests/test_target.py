"""The target loader: presets, the embedded GGUF target and its converted cache, identity, clear errors."""

from __future__ import annotations

import pytest
import torch

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import TargetSpec, cache_root, load_target, tokenizer_hash


def test_embedded_target_identity_and_cache(real_target):
    identity = real_target.identity
    assert identity.name == "smollm2-135m-instruct"
    assert len(identity.weights_hash) == 64 and len(identity.tokenizer_hash) == 64
    assert "<|im_start|>" in identity.chat_template
    config = real_target.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    converted = cache_root() / "targets" / f"smollm2-135m-instruct-{identity.weights_hash[:16]}"
    assert (converted / "model.safetensors").is_file(), "the converted copy must be cached for fast reloads"
    assert not any(p.requires_grad for p in real_target.model.parameters()), "the target is frozen"


def test_embedded_target_answers_like_a_chat_model(real_target):
    tokenizer = real_target.tokenizer
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = real_target.model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer


def test_tokenizer_hash_changes_with_vocabulary(real_target):
    tokenizer = real_target.tokenizer
    before = tokenizer_hash(tokenizer)
    assert before == real_target.identity.tokenizer_hash
    changed = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    changed.add_tokens(["<draftsmith-extra-token>"])
    assert tokenizer_hash(changed) != before


def test_presets_resolve_and_unknown_keys_are_named():
    spec = TargetSpec.from_any("vicuna-7b-v1.3")
    assert spec.source == "lmsys/vicuna-7b-v1.3" and spec.gguf_package is None
    with pytest.raises(DraftsmithError, match="unknown target key.*flavour"):
        TargetSpec.from_any({"name": "x", "source": "y", "flavour": "z"})


def test_hub_target_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DraftsmithError, match=r"lmsys/vicuna-7b-v1.3.*local folder"):
        load_target("vicuna-7b-v1.3")


def test_missing_gguf_package_says_how_to_install():
    spec = TargetSpec(name="ghost", gguf_package="no_such_package_here", gguf_file="x.gguf")
    with pytest.raises(DraftsmithError, match="pip install"):
        load_target(spec)


def test_local_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(DraftsmithError, match="not a transformers model"):
        load_target({"name": "local", "source": str(tmp_path)})


def test_dtype_is_validated():
    with pytest.raises(DraftsmithError, match="unknown dtype"):
        load_target({"name": "x", "source": "y", "dtype": "float33"})


def test_auto_dtype_is_float32_on_cpu(real_target):
    assert real_target.model.dtype == torch.float32


def test_path_that_does_not_exist_is_named_as_a_folder():
    with pytest.raises(DraftsmithError, match="target folder /no/such/model does not exist"):
        load_target("/no/such/model")


def test_named_chat_template_for_tokenizers_without_one():
    assert TargetSpec.from_any("vicuna-7b-v1.3").chat_template == "vicuna"
