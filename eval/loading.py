"""Resolve ``drafter=NAME_OR_PATH``: a training-free kind by name, anything else an export folder / Hub id."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import drafters  # noqa: F401 - registers the trained drafter kinds
from drafters.base import ADAPTER_KEY, Drafter
from drafters.errors import DraftsmithError
from drafters.target import Target
from eval.layerskip_search import load_or_search
from eval.ngram_drafter import NgramDrafter
from eval.plain_drafter import PlainDrafter

TRAINING_FREE = ("ar", "ngram", "layerskip")


def _check_target(drafter: Drafter, where: str, target: Target) -> None:
    recorded = getattr(drafter, "export_config", {}).get("target")
    if not isinstance(recorded, dict) or not recorded.get("weights_hash"):
        return
    if recorded["weights_hash"] != target.identity.weights_hash:
        raise DraftsmithError(
            f"drafter {where} was trained for target {recorded.get('name', '?')!r}, not for "
            f"{target.identity.name!r} (different weights); pass target={recorded.get('name', 'ITS_TARGET')}"
        )


def load_drafter(
    name_or_path: str | Path, target: Target, tree_nodes: int | None = None, merge_adapter: bool = True
) -> Drafter:
    """``ar`` | ``ngram`` | ``layerskip`` by name; otherwise `Drafter.from_pretrained` against ``target``.

    ``tree_nodes`` rebuilds a tree drafter's candidate tree at that size from its measured accuracies.
    An export that carries a target adapter (Medusa-2) has it merged into ``target.model`` for good, so plain
    and speculative decoding both run the adapted target the drafter was trained with; ``merge_adapter=False``
    leaves that to a later `adapt_target` (to decode with the original target first).
    """
    name = str(name_or_path)
    drafter = _load(name, target)
    if merge_adapter:
        adapt_target(drafter, target)
    if tree_nodes is not None:
        if not hasattr(drafter, "resize_tree"):
            raise DraftsmithError(f"tree_nodes applies to tree drafters (medusa, amphista), not to {name}")
        drafter.resize_tree(tree_nodes)
    return drafter


def _load(name: str, target: Target) -> Drafter:
    if name == "ar":
        return PlainDrafter()
    if name == "ngram":
        return NgramDrafter()
    if name == "layerskip":
        return load_or_search(target)
    try:
        drafter = Drafter.from_pretrained(name, target=target.model, tokenizer_hash=target.identity.tokenizer_hash)
    except FileNotFoundError as err:
        raise DraftsmithError(f"{err}, or a training-free drafter: {', '.join(TRAINING_FREE)}") from None
    except (ValueError, KeyError) as err:  # tokenizer mismatch, unknown kind or option, malformed config
        raise DraftsmithError(str(err)) from None
    _check_target(drafter, name, target)
    _check_adapter(drafter)
    return drafter.to(target.device).eval()


def _check_adapter(drafter: Drafter) -> None:
    """Refuse an export whose config names a target adapter that is not there, before any decoding."""
    folder = drafter.export_config.get(ADAPTER_KEY)
    if folder and not (drafter.export_dir / folder / "adapter_config.json").is_file():
        raise DraftsmithError(f"{drafter.export_dir}/config.json names the target adapter {folder}/, which is missing")


def carries_adapter(drafter: Drafter) -> bool:
    """Was ``drafter`` exported with a target adapter (Medusa-2) that the target must run with?"""
    return bool(getattr(drafter, "export_config", {}).get(ADAPTER_KEY))


def adapt_target(drafter: Drafter, target: Target) -> None:
    """Merge the export's target adapter, if any, into the target (after `_check_target`: the recorded weights
    are the base target's). The LM head the drafter borrowed is not adapted, so its binding stays valid."""
    if not carries_adapter(drafter):
        return
    folder = drafter.export_config[ADAPTER_KEY]
    path = drafter.export_dir / folder  # present: `_check_adapter` ran when the drafter was loaded
    from peft import PeftModel

    target.model = PeftModel.from_pretrained(target.model, str(path)).merge_and_unload().eval()
    # reports name the model that was measured; the weights hash stays the base target's, which exports record
    target.identity = dataclasses.replace(target.identity, name=f"{target.identity.name} + {folder}/ of the drafter")
