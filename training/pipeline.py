"""The whole `python train.py` run: target -> distilled data -> drafter -> Lightning fit -> export -> final
eval -> acceptance table -> publish."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from draftsmith import data
from draftsmith.drafters.base import Drafter, DrafterConfig, TargetNeeds, drafter_class
from draftsmith.drafters.draft_vocab import UsesDraftVocab, check_size, coverage, most_frequent
from draftsmith.drafters.engine_formats import engine_forms
from draftsmith.drafters.errors import DraftsmithError, writable_folder
from draftsmith.drafters.target import Target, load_target
from draftsmith.training.callbacks import AcceptanceEval
from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.export import Exporter
from draftsmith.training.features import CachedFeatures, FeatureSource, OnlineFeatures
from draftsmith.training.lora import adapts_target, check_online
from draftsmith.training.module import DrafterModule, frozen_target_expected
from draftsmith.training.report import print_acceptance
from draftsmith.training.settings import AcceptanceSettings, TrainSettings, store_schemas
from draftsmith.training.strategies import trainer_arguments

REPO_ROOT = Path(__file__).resolve().parents[1]
store_schemas()  # the recipes' YAMLs name their schemas (base_*): Hydra's compose API needs them stored


def drafter_config(values: Any) -> DrafterConfig:
    """The `drafter` config group as its kind's validated config."""
    values = dict(OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else values)
    kind = values.pop("kind", None)
    try:
        return drafter_class(str(kind)).config_class.from_dict(values)
    except ValueError as err:
        raise DraftsmithError(f"drafter config: {err}") from None


def build_drafter(values: Any, target: Target, pretrained: bool = True) -> Drafter:
    """A fresh drafter from the `drafter` config group, bound to the target's shared modules and, with
    ``drafter.init_from`` set and ``pretrained``, started from those weights (`Drafter.init_weights`)."""
    config = drafter_config(values)
    drafter = drafter_class(config.kind)(config)
    drafter.bind(target.model)
    if pretrained and config.init_from:
        drafter.init_weights(str(config.init_from), target.model)
    return drafter


def prepare_draft_vocab(drafter: Drafter, datamodule: DistillDataModule) -> None:
    """With ``drafter.draft_vocab=N``, before training: the map of the N most frequent target-written tokens of
    the training rows (a map that came with ``drafter.init_from`` is kept), and its coverage printed."""
    if not isinstance(drafter, UsesDraftVocab) or drafter.vocab_map is None:
        return
    vocab_map, vocab = drafter.vocab_map, int(drafter.config.vocab_size)
    counts = datamodule.target_token_counts(vocab)
    kept = vocab_map.ready
    if not kept:
        drafter.set_draft_vocab(most_frequent(counts, vocab_map.size))
    print(
        f"draft vocabulary ({'kept from drafter.init_from' if kept else 'built'}): {vocab_map.size} of {vocab} tokens "
        f"cover {coverage(counts, vocab_map.ids.cpu()):.1%} of the {int(counts.sum()):,} target-written tokens "
        "of the training rows"
    )


def resolve_path(path: str | Path) -> Path:
    """A path as given, or else relative to the repository (recipes name files inside it)."""
    path = Path(path)
    return path if path.exists() or path.is_absolute() else REPO_ROOT / path


def load_eval_questions(eval_cfg: Any) -> list[Any]:
    """The acceptance-eval questions (``eval.questions``, null = eval's default set): ``eval.limit`` of them,
    round-robin over the categories."""
    from draftsmith.eval.questions import DEFAULT_QUESTIONS, HUMANEVAL, across_categories, load_questions

    path = eval_cfg.get("questions") or DEFAULT_QUESTIONS
    questions = load_questions(path if path == HUMANEVAL else resolve_path(path))
    limit = eval_cfg.get("limit")
    return questions if limit is None else across_categories(questions, int(limit))


def feature_source(settings: TrainSettings, data_dir: Path, data_cfg: Any, drafter: Drafter) -> FeatureSource:
    topk = int(OmegaConf.select(data_cfg, "features.topk", default=0) or 0)
    if settings.features == "online":
        return OnlineFeatures(topk=topk)
    if not OmegaConf.select(data_cfg, "features.enabled", default=False):
        raise DraftsmithError("trainer.features=cache needs data.features.enabled=true (to build the feature cache)")
    from draftsmith.data.features import FeatureCache, cache_folder

    needs = drafter.target_needs()
    layers = tuple(int(layer) for layer in OmegaConf.select(data_cfg, "features.layers", default=[-1]))
    if needs.logits or not set(needs.hidden_layers) <= set(layers):
        raise DraftsmithError(
            f"the {drafter.config.kind} drafter needs hidden layers {list(needs.hidden_layers)}"
            f"{' and full logits' if needs.logits else ''}, the cache has layers {list(layers)}: "
            "set data.features.layers to include them, or train with trainer.features=online"
        )
    return CachedFeatures(FeatureCache(cache_folder(data_dir, TargetNeeds(hidden_layers=layers), topk)))


def check_adapted_target(config: DrafterConfig, settings: TrainSettings, zero3: bool) -> None:
    """A drafter that adapts the target (Medusa-2) trains it online, and not under ZeRO-3, whose final export
    rebuilds the drafter alone from the checkpoint and would lose the adapter."""
    check_online(config, settings.features == "online")
    if zero3 and adapts_target(config):
        raise DraftsmithError(
            "Medusa-2 (drafter.lora_rank > 0) is not supported with ZeRO-3: use trainer=deepspeed_zero2 or ddp"
        )


def checkpoint_callbacks(directory: Path, every_n_steps: int) -> list[ModelCheckpoint]:
    """last.ckpt after every ``every_n_steps`` optimizer steps and at every epoch end (whichever is later).

    Two callbacks because Lightning makes step and epoch triggers exclusive; last.ckpt is a link to the newer
    of their two files, so each checkpoint is written once.
    """
    common = {"dirpath": directory, "save_top_k": 1, "save_last": "link", "enable_version_counter": False}
    return [
        ModelCheckpoint(filename="mid-epoch", every_n_train_steps=every_n_steps, **common),
        ModelCheckpoint(filename="epoch-end", every_n_epochs=1, save_on_train_epoch_end=True, **common),
    ]


def resume_checkpoint(out: Path, resume: bool) -> Path | None:
    last = out / "checkpoints" / "last.ckpt"
    if not resume:
        return None
    if not last.exists():
        raise DraftsmithError(f"resume=true but {last} does not exist: run once without resume, or fix out=")
    if last.is_file():  # a DeepSpeed checkpoint is a folder, which Lightning checks itself
        _check_checkpoint(last)
    return last


def _check_checkpoint(path: Path) -> None:
    """Refuse a truncated or corrupt checkpoint before the slow steps: `torch.save` writes a zip archive, whose
    checksums show damage anywhere in the file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        reason = None if damaged is None else f"{damaged} fails its checksum"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        reason = str(err) or type(err).__name__
    if reason is not None:
        real = path.resolve()
        named = path if real == path.absolute() else f"{path} (-> {real.name})"
        raise DraftsmithError(
            f"resume=true but {named} cannot be read ({reason}): the checkpoint is truncated or corrupt; resume from "
            f"another checkpoint in {path.parent} (link last.ckpt to it), or run without resume=true"
        )


def zero3_drafter(checkpoint: Path, drafter: Drafter) -> Drafter:
    """The full drafter weights of a ZeRO-3 run, gathered from its last checkpoint's partitions."""
    import torch
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    merged = checkpoint.with_name("merged-fp32.pt")
    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(merged))
    state = torch.load(merged, map_location="cpu", weights_only=False)["state_dict"]
    drafter.load_state_dict({k.removeprefix("drafter."): v for k, v in state.items() if k.startswith("drafter.")})
    return drafter


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """Rich's bar on a terminal; under nohup or a scheduler (output to a file) rich prints nothing, so a
    tqdm bar that writes a line every few steps instead."""
    if sys.stderr.isatty():
        return RichProgressBar()
    return TQDMProgressBar(refresh_rate=10)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Train, export, evaluate and (if asked) publish; returns the final evaluation summary on rank 0."""

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise DraftsmithError(f"{', '.join(missing)} has no value: give it on the command line (KEY=...)")
    if OmegaConf.select(cfg, "data.prompts") is None:
        raise DraftsmithError(
            f"recipe {cfg.recipe_name} needs your prompt file: data.prompts=PATH (a ShareGPT JSON/JSONL, a "
            "Spec-Bench-style JSONL, or a datasets name)"
        )
    settings = TrainSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True))
    out = Path(cfg.out)
    writable_folder(out, "out")
    # before the slow steps, so a typo or a missing DeepSpeed fails at once
    ckpt_path = resume_checkpoint(out, bool(cfg.resume))
    evaluation = AcceptanceSettings.from_config(cfg.eval)
    trainer_kwargs = trainer_arguments(settings)
    zero3 = settings.strategy == "deepspeed" and settings.zero_stage == 3
    config = drafter_config(cfg.drafter)
    check_adapted_target(config, settings, zero3)
    engine_forms(config, list(cfg.export.engines))  # a form the kind lacks is refused before the slow steps
    L.seed_everything(int(cfg.seed), workers=True)
    target = load_target(OmegaConf.to_container(cfg.target, resolve=True))
    check_size(config.kind, getattr(config, "draft_vocab", None), target.model.get_output_embeddings().weight.shape[0])
    data_dir = Path(data.build_distilled(cfg.data, target))
    table = data.load_distilled(data_dir)
    drafter = build_drafter(cfg.drafter, target)
    pad_id = target.tokenizer.pad_token_id
    datamodule = DistillDataModule(
        table,
        batch_size=settings.batch_size,
        val_fraction=settings.val_fraction,
        max_length=settings.max_length,
        pad_id=int(pad_id if pad_id is not None else target.tokenizer.eos_token_id or 0),
        seed=int(cfg.seed),
        sort_chunk=settings.sort_chunk,
        num_workers=settings.num_workers,
    )
    prepare_draft_vocab(drafter, datamodule)
    module = DrafterModule(drafter, target.model, settings, feature_source(settings, data_dir, cfg.data, drafter))
    if settings.strategy == "deepspeed":
        module.strict_loading = False  # DeepSpeed checkpoints leave the frozen target out
    exporter = Exporter(
        out / "export", target.identity, OmegaConf.to_container(cfg, resolve=True), module.adapter, target.model
    )
    acceptance = AcceptanceEval(
        target,
        load_eval_questions(cfg.eval),
        exporter,
        max_new_tokens=evaluation.max_new_tokens,
        temperature=evaluation.temperature,
        out=out / "epoch_eval",
        seed=int(cfg.seed),
        keep=evaluation.keep,
        every_epoch=not zero3,  # ZeRO-3 shards the target: evaluate once after training instead
        tree_nodes=evaluation.tree_nodes,
    )
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=out,
        logger=TensorBoardLogger(out, name="tensorboard"),
        callbacks=[
            progress_bar(),
            LearningRateMonitor(logging_interval="step"),
            acceptance,
            *checkpoint_callbacks(out / "checkpoints", settings.checkpoint_every_n_steps),
        ],
    )
    device = target.device
    with frozen_target_expected():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    module.to(device)  # Lightning's teardown moves the module to the CPU; the final eval runs where training did
    if not trainer.is_global_zero:
        return None
    return finish(cfg, out, target, module, acceptance, exporter, zero3, trainer.global_step)


def finish(
    cfg: DictConfig,
    out: Path,
    target: Target,
    module: DrafterModule,
    acceptance: AcceptanceEval,
    exporter: Exporter,
    zero3: bool,
    final_step: int,
) -> dict[str, Any] | None:
    """Rank 0 after fit: make sure the export holds the drafter to keep (``eval.keep``), evaluate it into
    ${out}/eval, publish."""
    summary = None
    if acceptance.holds_final(final_step):
        # the kept export was evaluated after its epoch with these very settings: reuse that evaluation
        shutil.rmtree(out / "eval", ignore_errors=True)
        shutil.copytree(acceptance.kept_epoch_dir, out / "eval")
        summary = acceptance.kept_summary
    else:
        drafter = module.drafter
        if zero3:
            target = load_target(OmegaConf.to_container(cfg.target, resolve=True))
            drafter = build_drafter(cfg.drafter, target, pretrained=False)
            zero3_drafter(out / "checkpoints" / "last.ckpt", drafter)
        if acceptance.questions:
            summary = acceptance.measure(module, out / "eval", target=target, drafter=drafter)
        exporter.write(drafter, summary)
    if summary is not None:
        print_acceptance(summary, f"{cfg.recipe_name}: acceptance of {out / 'export'}")
    repo_id = OmegaConf.select(cfg, "publish.repo_id")
    if repo_id:
        from draftsmith.training.publish import publish

        url = publish(out / "export", str(repo_id), private=bool(cfg.publish.private))
        print(f"published {out / 'export'} to {url}")
    return summary
