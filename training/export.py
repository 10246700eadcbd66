"""The export folder (docs/design.md, "Export format"): config.json, model.safetensors, README.md, recipe.yaml,
eval/summary.json, and for a drafter trained with an adapted target (Medusa-2) the target's peft adapter in
adapter/. It is also exactly what `training.publish` uploads to the Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf
from safetensors import SafetensorError
from torch import nn

from draftsmith.drafters.base import ADAPTER_DIR, ADAPTER_KEY, Drafter
from draftsmith.drafters.engine_formats import ENGINE_FORMS, engine_forms, write_engine_forms
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import TargetIdentity
from draftsmith.eval.report import drift_sentence, shape_line
from draftsmith.training.report import markdown_table
from draftsmith.training.serving import FORM_ENGINES, closest_route, serving_command


def _base_model(identity: TargetIdentity, target_source: str | None) -> str | None:
    """The Hub id of the target, when there is one (a GGUF or a local folder has none)."""
    for candidate in (target_source, identity.source):
        if candidate and candidate.count("/") == 1 and not Path(candidate).exists() and ":" not in candidate:
            return candidate
    return None


ADAPTED_TARGET = """
## The adapted target

This drafter was trained jointly with a LoRA adapter of the target (Medusa-2), which this export carries in
`{folder}/` (peft, safetensors). The model to serve is the **adapted** target: `{name}` with that adapter
merged in. The evaluation above verified drafts with the adapted target, and speculative decoding is lossless
with respect to it; its outputs can differ from those of the original `{name}`. `python -m eval` and
`eval.loading.load_drafter` merge the adapter themselves; by hand, with peft:

```python
from peft import PeftModel

target.model = PeftModel.from_pretrained(target.model, "PATH_OR_HUB_ID", subfolder="{folder}").merge_and_unload()
```
"""


def model_card(
    drafter: Drafter,
    identity: TargetIdentity,
    summary: dict[str, Any] | None,
    target_source: str | None,
    adapted: bool = False,
    engines: list[str] = (),
) -> str:
    kind = drafter.config.kind
    data = ModelCardData(
        base_model=_base_model(identity, target_source),
        library_name="draftsmith",
        tags=["draftsmith", "speculative-decoding", f"drafter-{kind}"],
        pipeline_tag="text-generation",
    )
    sentence = drift_sentence(summary) if summary else None
    drift = f"\n{sentence}\n" if sentence else ""
    metrics = (
        f"Greedy speculative decoding on {summary.get('n_questions', '?')} held-out questions "
        f"(tau = tokens per target forward, bonus token included; alpha_k = acceptance of draft position k "
        f"given 1..k-1 accepted; speedup = wall-clock tokens/s against plain decoding, same process):\n\n"
        f"{markdown_table(summary)}\n\n{shape_line(summary)}\n{drift}"
        if summary
        else "No evaluation was run for this export.\n"
    )
    body = f"""
# {kind} drafter for {identity.name}

A `{kind}` drafter for speculative decoding with the frozen target `{identity.name}` (`{identity.source}`),
trained with draftsmith. It proposes draft tokens; the target verifies them, so the
output of greedy decoding is the target's own.

## Evaluation

{metrics}
## Use

```python
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.target import load_target

target = load_target("{identity.name}")
drafter = Drafter.from_pretrained("PATH_OR_HUB_ID", target=target.model,
                                  tokenizer_hash=target.identity.tokenizer_hash)
```

Evaluate it (speculative decoding against plain decoding of the same target):

```bash
python -m eval drafter=PATH_OR_HUB_ID
```

The drafter refuses a target whose tokenizer differs (tokenizer hash `{identity.tokenizer_hash[:12]}`).
`recipe.yaml` holds the full configuration it was trained with; `eval/summary.json` the evaluation above.
"""
    if adapted:
        body += ADAPTED_TARGET.format(folder=ADAPTER_DIR, name=identity.name)
    body += serving_section(drafter, identity, data.base_model, engines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


ENGINE_NAMES = {"vllm": "vLLM", "speculators": "speculators", "sglang": "SGLang"}


def serving_section(drafter: Drafter, identity: TargetIdentity, base_model: str | None, engines: list[str]) -> str:
    """The card's "Serving engines": which engine loads which of ``engines`` (the forms in ``engines/``), with
    the command that serves the target with it; or, without forms, how to get one or what comes closest."""
    config = drafter.config
    section = "\n## Serving engines\n\n"
    if not engines:
        if engine_forms(config, ["auto"]):
            return section + (
                "This export carries no engine forms. Write the one an engine loads with "
                "`draftsmith-export PATH --to vllm|speculators|sglang` (PATH: this export's folder).\n"
            )
        route = closest_route(config)
        return section + f"No serving engine loads this {config.kind} drafter. Closest engine route: {route}.\n"
    target = base_model or "TARGET"
    section += (
        "`engines/` holds this drafter in the forms serving engines load. PATH is a local copy of this export "
        "(`hf download ORG/NAME --local-dir PATH` for a published one)"
    )
    if base_model is None:
        section += f"; TARGET is `{identity.name}` as the engine loads it (a Hub id or a transformers folder)"
    elif identity.source != base_model:  # e.g. the embedded target: a GGUF of that repo's model
        section += (
            f". It was trained against `{identity.source}`; an engine serving `{base_model}` runs that repo's "
            "weights, and decoding stays lossless with respect to them (acceptance may differ a little)"
        )
    section += ".\n\n"
    items = []
    for form in engines:
        served_by = " and ".join(ENGINE_NAMES[engine] for engine in FORM_ENGINES[form])
        command = serving_command(form, config, f"PATH/engines/{form}", target)
        items.append(f"- `engines/{form}` ({served_by}):\n\n  ```bash\n  {command}\n  ```\n")
    return section + "\n".join(items)


def refresh_model_card(directory: str | Path, drafter: Drafter) -> Path:
    """Rewrite the README.md of the export ``directory`` (loaded as ``drafter``) for the engine forms now in its
    ``engines/`` (`draftsmith-export` adds them); the rest of the card is redrawn from the export's own files."""
    directory = Path(directory)
    config = drafter.export_config
    identity = TargetIdentity(**config["target"])
    summary_path = directory / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    recipe = directory / "recipe.yaml"
    resolved = OmegaConf.load(recipe) if recipe.is_file() else OmegaConf.create()
    target_source = OmegaConf.select(resolved, "target.source", default=None)
    present = {path.parent.name for path in (directory / "engines").glob("*/config.json")}
    engines = [form for form in ENGINE_FORMS.get(drafter.config.kind, ()) if form in present]
    card = model_card(drafter, identity, summary, target_source, adapted=bool(config.get(ADAPTER_KEY)), engines=engines)
    staged = directory / "README.md.partial"
    staged.write_text(card)
    staged.replace(directory / "README.md")
    return directory / "README.md"


def write_export(
    directory: str | Path,
    drafter: Drafter,
    identity: TargetIdentity,
    config: Any,
    summary: dict[str, Any] | None = None,
    adapter: nn.Module | None = None,
    target_model: nn.Module | None = None,
) -> Path:
    """Write the export folder; a new one replaces the old only once it is complete.

    ``adapter``: the peft-wrapped target of a Medusa-2 run; its adapter (not the base weights) goes to adapter/.
    ``target_model``: the frozen target, for the serving-engine forms ``config.export.engines`` asks for.
    """
    directory = Path(directory)
    try:
        return _write_staged(directory, drafter, identity, config, summary, adapter, target_model)
    except (OSError, SafetensorError) as err:  # a file where a folder should be, no permission, a full disk
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        if isinstance(err, OSError) and err.strerror:
            reason = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        raise DraftsmithError(
            f"cannot write the export {directory} ({reason}): pass out= a folder you can write to, "
            "on a disk with free space"
        ) from None


def _write_staged(
    directory: Path,
    drafter: Drafter,
    identity: TargetIdentity,
    config: Any,
    summary: dict[str, Any] | None,
    adapter: nn.Module | None,
    target_model: nn.Module | None,
) -> Path:
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    resolved = OmegaConf.create(config) if not OmegaConf.is_config(config) else config
    target_source = OmegaConf.select(resolved, "target.source", default=None)
    extra = {"target": identity.to_dict(), "tokenizer_hash": identity.tokenizer_hash}
    if adapter is not None:
        extra[ADAPTER_KEY] = ADAPTER_DIR
    drafter.save_pretrained(staging, extra_config=extra)
    if adapter is not None:
        # a Hub id or nothing: peft would otherwise record this machine's path of the converted target
        for adapter_config in adapter.peft_config.values():
            adapter_config.base_model_name_or_path = _base_model(identity, target_source)
        # embeddings are never adapted (MedusaConfig refuses them); "auto" would ask the Hub about the base model
        adapter.save_pretrained(staging / ADAPTER_DIR, save_embedding_layers=False)
        # peft's own card is a blank template naming this machine's target folder; README.md covers the adapter
        (staging / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
    requested = list(OmegaConf.select(resolved, "export.engines", default=None) or [])
    engines = engine_forms(drafter.config, requested) if target_model is not None else []
    write_engine_forms(drafter, staging / "engines", target_model, target_source or identity.name, engines)
    card = model_card(drafter, identity, summary, target_source, adapted=adapter is not None, engines=engines)
    (staging / "README.md").write_text(card)
    (staging / "recipe.yaml").write_text(OmegaConf.to_yaml(resolved, resolve=True))
    if summary is not None:
        (staging / "eval").mkdir()
        (staging / "eval" / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    return directory


class Exporter:
    """Writes the export of one run: what stays the same between exports (target, config, folder)."""

    def __init__(
        self,
        directory: str | Path,
        identity: TargetIdentity,
        config: Any,
        adapter: nn.Module | None = None,
        target_model: nn.Module | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.config = config
        self.adapter = adapter
        self.target_model = target_model

    def write(self, drafter: Drafter, summary: dict[str, Any] | None) -> Path:
        return write_export(
            self.directory, drafter, self.identity, self.config, summary, self.adapter, self.target_model
        )
