"""The checkpoint forms serving engines load, written from draftsmith drafters (and one read back).

- EAGLE-3 -> speculators (`write_speculators`): what vllm-project/speculators 0.9.0 saves for its
  ``Eagle3DraftModel``, which vLLM reads through its speculators config adapter.
- EAGLE-3 -> SGLang (`write_sglang_eagle3`): the original EAGLE-3 layout SGLang's ``LlamaForCausalLMEagle3`` reads.
- Medusa -> vLLM (`write_vllm_medusa`): vLLM's ``MedusaModel``.
- speculators EAGLE-3 -> draftsmith (`load_speculators`), refusing what the backbone cannot represent.

Sources, read, not copied: speculators 0.9.0 (models/eagle3/{config,core,model_definitions}.py, model.py,
config.py, convert/eagle/eagle3_converter.py); vLLM (model_executor/models/{llama,llama_eagle3,medusa}.py,
transformers_utils/configs/{medusa,speculators/algos,speculators/base}.py, v1/worker/gpu_model_runner.py);
SGLang (python/sglang/srt/models/{llama,llama_eagle3}.py, model_executor/model_runner.py).

Which target layers feed the drafter -- the off-by-one. draftsmith's ``feature_layers`` index transformers'
``hidden_states``: 0 = embeddings, i = the output of decoder layer i counted from 1 = the residual stream
*entering* 0-based layer i.
- vLLM and speculators: id i is captured before running 0-based layer i (vLLM ``llama.py``: ``if idx in
  aux_hidden_state_layers: aux.append(hidden_states + residual)`` ahead of ``layer(...)``; speculators generates
  its training data with vLLM), so **speculators id = draftsmith index**, no shift; both default to
  ``[2, L // 2, L - 3]``, draftsmith's default too.
- SGLang: an explicit id k is captured before layer k + 1 (``set_eagle3_layers_to_capture`` adds 1: "for the ith
  layer, it takes the output of the (i-1)th layer"), i.e. the *output* of 0-based layer k, so **SGLang id =
  draftsmith index - 1**; its default (no ids) is ``[2, L // 2, L - 3]`` unshifted, as vLLM's.
  vLLM also reads ``eagle_config.eagle_aux_hidden_state_layer_ids``, unshifted: a SGLang folder with explicit
  ids is one layer off under vLLM, so the SGLang form writes no ids when the layers are the shared default.
The writers refuse index 0 (engines add a residual that is still None there) and index L (transformers' last
entry is after the final norm; engines capture only before a layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from draftsmith.drafters.base import DrafterConfig, resolve_export
from draftsmith.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaDrafter

SPECULATORS_VERSION = "0.9.0"  # the release whose eagle3 format this module writes and reads
ENGINE_AUX_LAYERS = 3  # vLLM's and SGLang's EAGLE-3 fc takes exactly 3 x hidden inputs (llama_eagle3.py, both)
# Fields speculators' Eagle3SpeculatorConfig has (models/eagle3/config.py) that draftsmith's backbone lacks: any
# of them true in a checkpoint is refused. vLLM's speculators/algos.py defaults norm_before_residual to *true*
# when the key is absent, so the writer always spells all of them out.
UNSUPPORTED_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output", "embed_requires_grad")


def _write(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # safetensors refuses tensors sharing storage (a head copied per Medusa head): each gets its own
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _bound(drafter: Eagle3Drafter) -> Eagle3Config:
    c = drafter.config
    if drafter.backbone is None or c.target_layers is None:
        raise DraftsmithError("the eagle3 drafter is not bound to its target: call drafter.bind(target_model) first")
    if c.dim != c.hidden_size:  # the engines embed tokens at the target's width, with no projection to the drafter's
        raise DraftsmithError(f"eagle3 dim={c.dim} differs from the target's {c.hidden_size}: engines cannot serve it")
    return c


def _engine_layers(c: Eagle3Config) -> list[int]:
    """draftsmith's feature layers, checked to have an engine equivalent (the module docstring says which)."""
    layers = list(c.layers())
    if len(layers) != ENGINE_AUX_LAYERS or any(not 0 < layer < c.target_layers for layer in layers):
        raise DraftsmithError(
            f"eagle3 feature_layers={layers}: vLLM and SGLang take exactly {ENGINE_AUX_LAYERS} target layers "
            f"between 1 and {c.target_layers - 1} (the embeddings and the final-norm output have no engine id)"
        )
    return layers


def _layer_config(c: Eagle3Config, target_config: Any) -> dict[str, Any]:
    """The drafter's layer as a transformers Llama config dict, key for key what speculators 0.9.0 writes as
    ``transformer_layer_config`` (``LlamaConfig.to_diff_dict()``; draftsmith's RoPE is the plain kind)."""
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": getattr(target_config, "bos_token_id", None),
        "eos_token_id": getattr(target_config, "eos_token_id", None),
        "head_dim": c.dim // c.attention_heads,
        "hidden_act": "silu",
        "hidden_size": c.dim,
        "initializer_range": 0.02,
        "intermediate_size": c.ffn_size,
        "max_position_embeddings": getattr(target_config, "max_position_embeddings", 4096),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": c.attention_heads,
        "num_hidden_layers": 1,
        "num_key_value_heads": c.kv_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": c.rms_eps,
        "rope_parameters": {"rope_theta": c.rope_base, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def _eagle3_tensors(drafter: Eagle3Drafter, layer_prefix: str) -> dict[str, torch.Tensor]:
    """fc, the layer under ``layer_prefix`` (its parameters are named as transformers' Llama layer, as the engines
    name theirs), norm and lm_head. No embed_tokens: draftsmith borrows the target's, which vLLM and SGLang
    share when a checkpoint has none (speculators loads them from the verifier). No d2t / t2d: the draft
    vocabulary is the target's, where speculators registers no maps, newer vLLM leaves draft_id_to_target_id
    None (a written d2t would have nowhere to go) and SGLang keeps no hot-token list."""
    b = drafter.backbone
    tensors = {"fc.weight": b.fc.weight, "norm.weight": b.norm.weight, "lm_head.weight": b.lm_head.weight}
    tensors.update({layer_prefix + key: value for key, value in b.midlayer.state_dict().items()})
    return tensors


def write_speculators(
    drafter: Eagle3Drafter, directory: str | Path, target_name_or_path: str, target_config: Any
) -> Path:
    """Write ``drafter`` as a speculators eagle3 checkpoint (``config.json`` + ``model.safetensors``).

    ``target_name_or_path`` is recorded as the verifier (speculators loads embeddings from it; vLLM reads it as
    the model the speculator belongs to); ``target_config`` is the target's transformers config. The proposal
    depth is ``ttt_steps``, the depth the drafter was trained to, as speculators' own trainer records it."""
    c = _bound(drafter)
    config = {
        "architectures": ["Eagle3DraftModel"],
        "draft_vocab_size": c.vocab_size,
        "dtype": str(drafter.backbone.fc.weight.dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": _engine_layers(c),  # = draftsmith's indices (module docstring)
        **dict.fromkeys(UNSUPPORTED_FLAGS, False),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "accept_tolerance": 0.0,
                    "proposal_type": "greedy",
                    "speculative_tokens": c.ttt_steps,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {
                "architectures": list(getattr(target_config, "architectures", None) or []),
                "name_or_path": target_name_or_path,
            },
        },
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "target_hidden_size": None,
        "tie_word_embeddings": False,
        "transformer_layer_config": _layer_config(c, target_config),
    }
    return _write(directory, config, _eagle3_tensors(drafter, "layers.0."))


def write_sglang_eagle3(drafter: Eagle3Drafter, directory: str | Path, target_config: Any) -> Path:
    """Write ``drafter`` in the original EAGLE-3 layout SGLang serves (``LlamaForCausalLMEagle3``).

    Weights ``fc``, ``midlayer.*``, ``norm``, ``lm_head`` (SGLang's llama_eagle3.py prefixes them with ``model.``
    itself). vLLM reads this layout too, renaming ``midlayer.`` to ``layers.0.`` and ``d2t`` to
    ``draft_id_to_target_id`` (vLLM llama_eagle3.py), but reads explicit layer ids unshifted: serve vLLM the
    speculators form. ``rope_theta`` sits beside ``rope_parameters`` for engines on transformers 4, which read
    only the former."""
    c = _bound(drafter)
    layers = _engine_layers(c)
    n = c.target_layers
    config = _layer_config(c, target_config)
    config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=c.vocab_size, rope_theta=c.rope_base)
    config["dtype"] = config["torch_dtype"] = str(drafter.backbone.fc.weight.dtype).removeprefix("torch.")
    eagle_config: dict[str, Any] = {"use_aux_hidden_state": True}
    if layers != [2, n // 2, n - 3]:  # the engines' shared default needs no ids, and then no shift
        eagle_config["eagle_aux_hidden_state_layer_ids"] = [layer - 1 for layer in layers]
    config["eagle_config"] = eagle_config
    return _write(directory, config, _eagle3_tensors(drafter, "midlayer."))


def write_vllm_medusa(
    drafter: MedusaDrafter, directory: str | Path, target_model: nn.Module, one_lm_head: bool = False
) -> Path:
    """Write ``drafter`` as vLLM's Medusa (``MedusaConfig`` in transformers_utils/configs/medusa.py, weights as
    models/medusa.py names them: ``blocks.{i}.layers.{j}.weight``/``.bias``, ``lm_heads.{i}.weight``).

    vLLM's heads own their vocabulary projections: heads sharing the target's LM head (``share_lm_head``) get a
    copy each, taken from ``target_model``; with ``one_lm_head`` a single copy and ``original_lm_head: true``,
    which vLLM loads from ``lm_heads.0.weight`` into one head all heads share (not every vLLM has that field).
    A Medusa-2 drafter's heads were trained against the adapted target: serve its merged target."""
    c = drafter.config
    if not drafter.built:
        raise DraftsmithError("the medusa drafter is not built yet: call drafter.bind(target_model) first")
    head = target_model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise DraftsmithError("vLLM's Medusa needs the target's LM head, without a bias: pass the drafter's target")
    dtype = next(drafter.heads.parameters(), head.weight).dtype
    tensors: dict[str, torch.Tensor] = {}
    for i, block in enumerate(drafter.heads.blocks):
        for j, residual in enumerate(block):
            tensors[f"blocks.{i}.layers.{j}.weight"] = residual.linear.weight
            tensors[f"blocks.{i}.layers.{j}.bias"] = residual.linear.bias
    shared = c.share_lm_head and one_lm_head
    for i in range(1 if shared else c.num_heads):
        weight = head.weight if c.share_lm_head else drafter.heads.projections[i]
        if tuple(weight.shape) != (c.vocab_size, c.hidden_size):
            raise DraftsmithError(f"the target's LM head is {tuple(weight.shape)}, not this drafter's vocab x hidden")
        tensors[f"lm_heads.{i}.weight"] = weight.to(dtype)
    config = {  # no other key may hold "num" with "heads"/"layers": vLLM's MedusaConfig renames those
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "truncated_vocab_size": c.vocab_size,
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "medusa_fc_bias": True,  # draftsmith's residual blocks have a bias; vLLM's default is none
        "original_lm_head": shared,
        "max_paths": 64,
        "topk": c.tree_topk,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return _write(directory, config, tensors)


def is_speculators_checkpoint(folder: str | Path) -> bool:
    """Does the local ``folder`` hold a speculators checkpoint (a ``config.json`` with ``speculators_model_type``)?"""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "speculators_model_type" in config


def _refusal(config: dict[str, Any], layer: dict[str, Any], target_config: Any) -> str | None:
    """What of a speculators eagle3 config draftsmith's backbone cannot represent, as a phrase; None if all fits."""
    if config.get("speculators_model_type") != "eagle3":
        return f"speculators_model_type={config.get('speculators_model_type')!r}, not 'eagle3'"
    flags = [name for name in UNSUPPORTED_FLAGS if config.get(name)]
    if flags:
        return f"{', '.join(flags)}=true, which draftsmith's eagle3 backbone does not have"
    rope, eps = layer.get("rope_parameters") or {}, layer.get("rms_norm_eps", 1e-6)  # LlamaConfig's default
    checks = (
        (layer.get("model_type") == "llama", f"a {layer.get('model_type')!r} layer, not a llama one"),
        (layer.get("num_hidden_layers", 1) == 1, f"{layer.get('num_hidden_layers')} draft layers, not 1"),
        (layer.get("hidden_act", "silu") == "silu", f"hidden_act={layer.get('hidden_act')!r}, not silu"),
        (not layer.get("attention_bias") and not layer.get("mlp_bias"), "biased projections"),
        (rope.get("rope_type", "default") == "default" and not layer.get("rope_scaling"), "scaled RoPE"),
        ("sliding_attention" not in (layer.get("layer_types") or []), "sliding-window attention"),
        (layer.get("head_dim") in (None, layer["hidden_size"] // layer["num_attention_heads"]), "a custom head_dim"),
        (config.get("target_hidden_size") in (None, layer["hidden_size"]), "a target_hidden_size other than its own"),
        (layer["hidden_size"] == target_config.hidden_size, f"hidden_size {layer['hidden_size']} (target's differs)"),
        (layer["vocab_size"] == target_config.vocab_size, f"vocab_size {layer['vocab_size']} (target's differs)"),
        (config.get("draft_vocab_size", layer["vocab_size"]) == layer["vocab_size"], "a truncated draft vocabulary"),
        (eps == getattr(target_config, "rms_norm_eps", eps), "an rms_norm_eps other than the target's"),
    )
    return next((why for ok, why in checks if not ok), None)


def load_speculators(folder: str | Path, target_model: nn.Module) -> Eagle3Drafter:
    """An `Eagle3Drafter` bound to ``target_model`` from a speculators eagle3 checkpoint (a folder or Hub id),
    or one DraftsmithError line naming the file when the checkpoint needs what the backbone cannot represent."""
    from safetensors.torch import load_file

    directory = resolve_export(folder)
    path, weights_path = directory / "config.json", directory / "model.safetensors"
    try:
        config = json.loads(path.read_text())
        layer = config["transformer_layer_config"]
        _ = [layer[key] for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")]
        depth = int(config["speculators_config"]["proposal_methods"][0]["speculative_tokens"])
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise DraftsmithError(f"{path} is not a speculators eagle3 config ({type(err).__name__}: {err})") from None
    target_config = target_model.config
    why = _refusal(config, layer, target_config)
    n = target_config.num_hidden_layers
    ids = config.get("eagle_aux_hidden_state_layer_ids") or [2, n // 2, n - 3]  # speculators' default (models/utils)
    if why is None and any(not 0 <= i < n for i in ids):
        why = f"eagle_aux_hidden_state_layer_ids={ids}, outside 0..{n - 1} for this {n}-layer target"
    if why is not None:
        raise DraftsmithError(f"{path}: {why}; draftsmith cannot load this drafter")
    if not weights_path.is_file():
        raise DraftsmithError(f"{weights_path} is missing: the checkpoint is incomplete")
    tensors = load_file(str(weights_path))
    own = {k: v for k, v in tensors.items() if k not in ("embed_tokens.weight", "d2t", "t2d")}
    if "d2t" in tensors and bool(tensors["d2t"].any()):
        raise DraftsmithError(f"{weights_path} holds a draft-to-target token map, which draftsmith does not have")
    embed, target_embed = tensors.get("embed_tokens.weight"), target_model.get_input_embeddings().weight
    if embed is not None and not torch.equal(embed, target_embed.detach().to(embed)):  # in the file's precision
        raise DraftsmithError(f"{weights_path} holds trained embeddings; draftsmith borrows the target's own")
    rope = layer.get("rope_parameters") or {}
    try:  # the config's own checks (head sizes ...) name the file too
        drafter = Eagle3Drafter(
            Eagle3Config(
                feature_layers=[int(i) for i in ids],
                dim=layer["hidden_size"],
                attention_heads=layer["num_attention_heads"],
                kv_heads=layer.get("num_key_value_heads") or layer["num_attention_heads"],
                ffn_size=layer["intermediate_size"],
                rope_base=float(rope.get("rope_theta", layer.get("rope_theta", 10000.0))),
                rms_eps=float(layer.get("rms_norm_eps", 1e-6)),
                ttt_steps=depth,
                hidden_size=target_config.hidden_size,
                vocab_size=target_config.vocab_size,
                target_layers=n,
            )
        )
    except DraftsmithError as err:
        raise DraftsmithError(f"{path}: {err}") from None
    state = {"backbone." + k.replace("layers.0.", "midlayer.", 1): v for k, v in own.items()}
    # Without an LM head of its own the drafter starts from the target's (bind copies it), as speculators
    # starts from the verifier's.
    state["backbone.lm_head_initialised"] = torch.tensor("lm_head.weight" in own)
    state.setdefault("backbone.lm_head.weight", drafter.backbone.lm_head.weight.detach())
    try:
        missing, unexpected = drafter.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes its config.json does not give
        raise DraftsmithError(f"{weights_path} does not fit its config.json: {' '.join(str(err).split())}") from None
    if missing or unexpected:  # fc_norm.*, a second layer, q_norm ...: what draftsmith has no place for

        def names(keys: list[str]) -> str:
            return ", ".join(k.removeprefix("backbone.").replace("midlayer.", "layers.0.", 1) for k in keys) or "-"

        raise DraftsmithError(
            f"{weights_path} does not fit draftsmith's eagle3 backbone (missing: {names(missing)}; "
            f"no place for: {names(unexpected)})"
        )
    drafter.to(target_embed.device)
    drafter.bind(target_model)
    return drafter


# The engine forms each kind has, and the folder each goes to inside an export (``engines/NAME``).
ENGINE_FORMS = {"eagle3": ("speculators", "sglang"), "medusa": ("vllm",)}
# Which engine loads which form, and with which settings: training/serving.py.


def engine_forms(config: DrafterConfig, requested: list[str]) -> list[str]:
    """The forms to write for a drafter of ``config``: ``["auto"]`` = every form its kind has; names it lacks are
    refused (a config is enough, so a run checks this before its slow steps)."""
    has = ENGINE_FORMS.get(config.kind, ())
    if getattr(config, "adapts_target", False):
        has = ()  # Medusa-2: an engine would serve the original target, not the adapted one the heads learned
    if getattr(config, "draft_vocab", None):
        has = ()  # the forms written here project onto the target's whole vocabulary, with no draft-to-target map
    if requested == ["auto"]:
        return list(has)
    missing = [name for name in requested if name not in has]
    if missing:
        raise DraftsmithError(
            f"export.engines: a {config.kind} drafter has no {', '.join(missing)} form "
            f"(it has: {', '.join(has) or 'none'}); set export.engines=[auto] or [] "
        )
    return list(requested)


def write_engine_forms(
    drafter: Any, directory: str | Path, target_model: nn.Module, target_name: str, forms: list[str]
) -> list[str]:
    """Write each of ``forms`` (see `engine_forms`) to ``directory/NAME``; returns the forms written."""
    directory = Path(directory)
    for name in forms:
        if name == "speculators":
            write_speculators(drafter, directory / name, target_name, target_model.config)
        elif name == "sglang":
            write_sglang_eagle3(drafter, directory / name, target_model.config)
        elif name == "vllm":
            write_vllm_medusa(drafter, directory / name, target_model, one_lm_head=True)
    return forms
