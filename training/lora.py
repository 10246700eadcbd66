"""Medusa-2's side of training: LoRA adapters on the target through peft, trained with the drafter, and the
self-distillation KL that keeps the adapted target close to the original one.

A drafter asks for it through its config (``adapts_target``, true for `drafters.medusa.MedusaConfig` with
``lora_rank`` > 0, and its ``lora_*`` fields). peft injects the adapters into the target's own modules, so
every holder of the target model (the evaluator after each epoch, the LM head the heads borrow) runs the
adapted target from then on; peft's ``disable_adapter()`` gives back the original target for the KL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftsmith.drafters.base import TargetNeeds
from draftsmith.drafters.errors import DraftsmithError

ONLINE_ONLY = (
    "the drafter adapts the target with LoRA (Medusa-2, lora_rank > 0), so its features must come from the live "
    "target: set trainer.features=online (the feature cache holds the original target's features)"
)


def adapts_target(config: Any) -> bool:
    """Does this drafter config train (and serve) a LoRA-adapted target?"""
    return bool(getattr(config, "adapts_target", False))


def check_online(config: Any, online: bool) -> None:
    if adapts_target(config) and not online:
        raise DraftsmithError(ONLINE_ONLY)


def attach_lora(model: nn.Module, config: Any) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters (B = 0: the adapted target starts as the original one).

    Only the adapters are trainable. Returns the peft model in eval mode: `set_dropout_mode` turns the
    adapters' dropout on for training; the target's own layers stay in eval mode throughout.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=int(config.lora_rank),
        lora_alpha=float(config.lora_alpha),
        lora_dropout=float(config.lora_dropout),
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        adapted = get_peft_model(model, lora)
    except ValueError as err:  # e.g. no module of the target matches lora_target_modules
        raise DraftsmithError(f"lora_target_modules={list(config.lora_target_modules)}: {err}") from None
    return adapted.eval()


def set_dropout_mode(model: nn.Module, training: bool) -> None:
    """Switch only the adapters' dropout (a no-op on a target without adapters)."""
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            module.train(training)


def adapter_start_step(config: Any) -> int:
    """The first optimizer step that updates the adapters (after the heads' warmup)."""
    return int(getattr(config, "heads_warmup_steps", 0))


def lora_param_groups(model: nn.Module, config: Any, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer group of the target's trainable (LoRA) weights, with ``lora_lr`` if set; none if frozen.
    It comes last among the groups: the schedule gives it its own start (`adapter_start_step`)."""
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        return []
    group: dict[str, Any] = {"params": params, "weight_decay": weight_decay}
    if getattr(config, "lora_lr", None) is not None:
        group["lr"] = float(config.lora_lr)
    return [group]


def self_distillation_kl(
    model: nn.Module, batch: dict[str, torch.Tensor], adapted_hidden: torch.Tensor
) -> torch.Tensor:
    """KL(original target || adapted target) of the next-token distributions, mean over the positions whose
    next token is target-written (``loss_mask``) and inside ``attention_mask``.

    ``adapted_hidden`` is the adapted target's last hidden state of this batch (with its graph); the original's
    comes from a no-grad forward with the adapters disabled. Only those positions go through the LM head, which
    LoRA leaves untouched: projecting the whole batch onto the vocabulary would dominate the step's cost.
    """
    from draftsmith.data.features import target_features

    inside = batch["attention_mask"].bool()
    counted = inside[:, :-1] & inside[:, 1:] & batch["loss_mask"][:, 1:].bool()
    rows, positions = counted.nonzero(as_tuple=True)
    head = model.get_output_embeddings()
    with torch.no_grad(), model.disable_adapter():
        original = target_features(model, batch["input_ids"], batch["attention_mask"], TargetNeeds(hidden_layers=(-1,)))
        original_logprobs = F.log_softmax(head(original["hidden"][-1][rows, positions]).float(), dim=-1)
    adapted_logprobs = F.log_softmax(head(adapted_hidden[rows, positions]).float(), dim=-1)
    if rows.numel() == 0:
        return adapted_logprobs.sum() * 0.0  # keeps the graph: every process backpropagates the same way
    return F.kl_div(adapted_logprobs, original_logprobs, log_target=True, reduction="batchmean")
