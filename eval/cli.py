"""`draftsmith-eval` (`python -m eval` in the repository): evaluate one drafter against its target.

`draftsmith-eval drafter=NAME_OR_PATH target=NAME questions=FILE limit=N max_new_tokens=N temperature=T out=DIR`"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from draftsmith.drafters.errors import hydra_cli, one_line_errors, writable_folder
from draftsmith.eval.config import EvalConfig

PRIMARY_CONFIG = resources.files("draftsmith.recipes") / "eval.yaml"
# Served from the ConfigStore rather than the recipes/ search path: there `drafter` and `target` are config
# groups of the training recipes, and Hydra would read `drafter=ngram` as a group choice. Its keys, their
# types and defaults are EvalConfig's (eval_schema, first in eval.yaml's defaults list); writable, although
# EvalConfig is frozen, so that Hydra can merge the command line into it.
SCHEMA = OmegaConf.structured(EvalConfig)
OmegaConf.set_readonly(SCHEMA, None)
ConfigStore.instance().store(name="eval_schema", node=SCHEMA)
ConfigStore.instance().store(name="eval", node=OmegaConf.create(PRIMARY_CONFIG.read_text()))


def run(cfg: DictConfig | EvalConfig) -> dict:
    from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions

    cfg = cfg if isinstance(cfg, EvalConfig) else EvalConfig.from_config(cfg)
    # questions first: a bad file is reported before the slow imports and the target load
    questions = load_questions(cfg.questions or DEFAULT_QUESTIONS)
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    writable_folder(cfg.out, "out")
    import torch

    from draftsmith.drafters.target import TargetSpec, load_target
    from draftsmith.eval.drift import greedy_turns
    from draftsmith.eval.loading import adapt_target, carries_adapter, load_drafter
    from draftsmith.eval.runner import evaluate

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    spec = TargetSpec.from_any(cfg.target)
    target = load_target(spec if cfg.dtype is None else dataclasses.replace(spec, dtype=cfg.dtype))
    drafter = load_drafter(cfg.drafter, target, tree_nodes=cfg.tree_nodes, merge_adapter=False)
    original = None
    if carries_adapter(drafter):  # Medusa-2: the original target answers first, for the drift figures
        original = greedy_turns(target, questions, cfg.max_new_tokens)
        adapt_target(drafter, target)
    return evaluate(
        target,
        drafter,
        questions,
        max_new_tokens=cfg.max_new_tokens,
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
        seed=cfg.seed,
        out=Path(cfg.out),
        drafter_name=cfg.drafter,
        original=original,
    )


@hydra_cli(version_base="1.3", config_path=None, config_name="eval")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        summary = run(cfg)
    keys = ("drafter", "target", "n_questions", "tau", "speedup", "lossless_mismatches", "adapter_drift")
    brief = {k: summary[k] for k in keys if k in summary}
    print(json.dumps(brief))
    print(f"wrote {cfg.out}/summary.json, results.jsonl, report.md and plots")
