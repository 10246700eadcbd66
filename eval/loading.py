"""Resolve ``drafter=NAME_OR_PATH``: a registered drafter kind by name (with its default settings), ``KIND+OTHER``
two drafters composed into one (`drafters.composed`), anything else an export folder / Hub id."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open

import draftsmith.drafters  # noqa: F401 - registers every drafter kind
from draftsmith.drafters.base import ADAPTER_KEY, Drafter, Tunable, drafter_class, drafter_kinds, resolve_export
from draftsmith.drafters.chat import ChatTemplate
from draftsmith.drafters.composed import ComposedConfig, ComposedDrafter
from draftsmith.drafters.engine_formats import is_speculators_checkpoint, load_speculators
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target
from draftsmith.eval.engine import SpeculativeDecoder, eos_token_ids
from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions

TUNING_CATEGORIES = ("writing", "qa", "summarisation")


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
    name_or_path: str | Path,
    target: Target,
    tree_nodes: int | None = None,
    merge_adapter: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> Drafter:
    """A registered kind by name (``ar``, ``ngram``, ``layerskip``, ...: `Drafter.for_target`, then `tune` for a
    kind that searches its settings per target); otherwise `Drafter.from_pretrained` against ``target``.

    ``tree_nodes`` sets the draft size (a tree drafter rebuilds its tree at that size from its measured accuracies).
    An export that carries a target adapter (Medusa-2) has it merged into ``target.model`` for good, so plain
    and speculative decoding both run the adapted target the drafter was trained with; ``merge_adapter=False``
    leaves that to a later `adapt_target` (to decode with the original target first). ``settings`` replace an
    export's drafter settings (eval's ``drafter_set``).
    """
    name = str(name_or_path)
    drafter = _load(name, target, settings or {})
    if merge_adapter:
        adapt_target(drafter, target)
    if tree_nodes is not None:
        drafter.set_draft_size(tree_nodes)
    return drafter


def tuning_prompts(target: Target) -> list[list[int]]:
    """Two first turns of the shipped questions (writing / qa / summarisation) to time a drafter's trials on."""
    picked = [q for q in load_questions(DEFAULT_QUESTIONS) if q.category in TUNING_CATEGORIES][::2][:2]
    template = ChatTemplate(target.tokenizer)
    return [template.first_prompt(q.turns[0]) for q in picked]


def _load(name: str, target: Target, settings: Mapping[str, Any]) -> Drafter:
    first, plus, second = name.partition("+")
    composed = plus and first in drafter_kinds() and not Path(name).exists()
    if settings and (composed or name in drafter_kinds()):
        raise DraftsmithError(
            f"drafter_set changes an export's settings; drafter={name} is not one export: evaluate an export folder"
        )
    if composed:
        return _compose(first, second, target)
    if name in drafter_kinds():
        drafter = drafter_class(name).for_target(target)
        if isinstance(drafter, Tunable) and drafter.needs_tuning:
            decoder = SpeculativeDecoder(target.model, eos_ids=eos_token_ids(target.model, target.tokenizer))
            drafter.tune(decoder, tuning_prompts(target))
        return drafter
    folder = resolve_export(name)
    if is_speculators_checkpoint(folder):  # an EAGLE-3 trained elsewhere (speculators' format)
        if settings:
            raise DraftsmithError(f"drafter_set needs a draftsmith export; {name} is a speculators checkpoint")
        return load_speculators(folder, target.model).to(target.device).eval()
    try:
        drafter = Drafter.from_pretrained(
            folder, target=target.model, tokenizer_hash=target.identity.tokenizer_hash, settings=settings
        )
    except FileNotFoundError as err:
        raise DraftsmithError(f"{err}, or a drafter kind: {', '.join(drafter_kinds())}") from None
    except (ValueError, KeyError) as err:  # tokenizer mismatch, unknown kind or option, malformed config
        raise DraftsmithError(str(err)) from None
    _check_target(drafter, name, target)
    _check_adapter(drafter)
    return drafter.to(target.device).eval()


def _compose(first: str, second: str, target: Target) -> ComposedDrafter:
    """``drafter=FIRST+SECOND``: both parts loaded as ``drafter=`` would load each, merged by `ComposedDrafter`."""
    parts = [_load(first, target, {}), _load(second, target, {})]
    if any(carries_adapter(part) for part in parts):
        raise DraftsmithError(
            f"drafter={first}+{second}: a drafter trained with an adapted target (Medusa-2) decodes with that target "
            "only; evaluate it alone"
        )
    return ComposedDrafter(parts, ComposedConfig(parts=(first, second))).to(target.device).eval()


def _check_adapter(drafter: Drafter) -> None:
    """Refuse an export whose config names a target adapter that is not there or is damaged, before any decoding."""
    folder = drafter.export_config.get(ADAPTER_KEY)
    if not folder:
        return
    config = drafter.export_dir / folder / "adapter_config.json"
    if not config.is_file():
        raise DraftsmithError(f"{drafter.export_dir}/config.json names the target adapter {folder}/, which is missing")
    redo = "re-export the drafter or download it again"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DraftsmithError(f"{config} is corrupt ({err}); {redo}") from None
    weights = config.with_name("adapter_model.safetensors")
    if not weights.is_file():
        raise DraftsmithError(f"{weights} is missing: the export's target adapter is incomplete; {redo}")
    try:
        with safe_open(str(weights), framework="pt"):  # the header only: a truncated file fails here
            pass
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise DraftsmithError(f"{weights} is truncated or corrupt ({first}); {redo}") from None


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

    try:
        target.model = PeftModel.from_pretrained(target.model, str(path)).merge_and_unload().eval()
    except (ValueError, KeyError, RuntimeError) as err:  # e.g. an adapter for other modules or shapes
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DraftsmithError(
            f"the target adapter {path} does not fit the target ({first}); re-export the drafter"
        ) from None
    # reports name the model that was measured; the weights hash stays the base target's, which exports record
    target.identity = dataclasses.replace(target.identity, name=f"{target.identity.name} + {folder}/ of the drafter")
