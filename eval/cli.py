"""`draftsmith-eval` (`python -m eval` in the repository): evaluate one drafter against its target.

`draftsmith-eval drafter=NAME_OR_PATH target=NAME questions=FILE limit=N max_new_tokens=N temperature=T out=DIR`
`draftsmith-eval profile=true [drafter=NAME_OR_PATH] [refresh=true]`: print the measured cost model and plot it."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from draftsmith.drafters.errors import hydra_cli, one_line_errors, writable_folder
from draftsmith.eval.config import EvalConfig

if TYPE_CHECKING:
    from draftsmith.drafters.target import Target
    from draftsmith.eval.questions import Question

PRIMARY_CONFIG = resources.files("draftsmith.recipes") / "eval.yaml"
# Served from the ConfigStore rather than the recipes/ search path: there `drafter` and `target` are config
# groups of the training recipes, and Hydra would read `drafter=ngram` as a group choice. Its keys, their
# types and defaults are EvalConfig's (eval_schema, first in eval.yaml's defaults list); writable, although
# EvalConfig is frozen, so that Hydra can merge the command line into it.
SCHEMA = OmegaConf.structured(EvalConfig)
OmegaConf.set_readonly(SCHEMA, None)
OmegaConf.set_struct(SCHEMA.drafter_set, False)  # its keys are the drafter's, checked when the export loads
ConfigStore.instance().store(name="eval_schema", node=SCHEMA)
ConfigStore.instance().store(name="eval", node=OmegaConf.create(PRIMARY_CONFIG.read_text()))


def _load(cfg: EvalConfig) -> tuple[list[Question], Target]:
    """The questions (a bad file is reported before the slow imports and the target load) and the target."""
    from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions

    questions = load_questions(cfg.questions or DEFAULT_QUESTIONS)
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    writable_folder(cfg.out, "out")
    import torch

    from draftsmith.drafters.target import TargetSpec, load_target

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    spec = TargetSpec.from_any(cfg.target)
    return questions, load_target(spec if cfg.dtype is None else dataclasses.replace(spec, dtype=cfg.dtype))


def run(cfg: DictConfig | EvalConfig) -> dict:
    cfg = cfg if isinstance(cfg, EvalConfig) else EvalConfig.from_config(cfg)
    questions, target = _load(cfg)
    from draftsmith.eval.drift import greedy_turns
    from draftsmith.eval.loading import adapt_target, carries_adapter, load_drafter
    from draftsmith.eval.runner import evaluate

    drafter = load_drafter(cfg.drafter, target, cfg.draft_size, merge_adapter=False, settings=cfg.drafter_set)
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
        tree_nodes="auto" if cfg.draft_size is None else None,
    )


def profile(cfg: DictConfig | EvalConfig) -> str:
    """Measure (or read the cached) cost model of the target, and the drafter's cost per proposal; write its
    plot to ``out``; return the table."""
    cfg = cfg if isinstance(cfg, EvalConfig) else EvalConfig.from_config(cfg)
    questions, target = _load(cfg)
    from draftsmith.drafters.chat import ChatTemplate
    from draftsmith.eval.cost_model import cost_table, measured_cost, profile_drafter, save_cost
    from draftsmith.eval.loading import adapt_target, load_drafter
    from draftsmith.eval.report import cost_plot

    drafter = load_drafter(cfg.drafter, target, cfg.draft_size, merge_adapter=False, settings=cfg.drafter_set)
    adapt_target(drafter, target)  # a Medusa-2 export decodes with its adapted target: that is what costs
    cost, path = measured_cost(target, refresh=cfg.refresh)
    if cfg.refresh or cfg.drafter not in cost.drafter_s:
        prompt = ChatTemplate(target.tokenizer).first_prompt(questions[0].turns[0])
        cost.drafter_s[cfg.drafter] = profile_drafter(target.model, drafter, prompt)
        save_cost(cost, path)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    plot = cost_plot(cost, Path(cfg.out) / "cost_model.png")
    return f"{cost_table(cost)}\ncached in {path}; plot: {plot}"


@hydra_cli(version_base="1.3", config_path=None, config_name="eval")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        if cfg.profile:
            print(profile(cfg))
            return
        summary = run(cfg)
    keys = ("drafter", "target", "n_questions", "tau", "speedup", "lossless_mismatches", "match_rate", "adapter_drift")
    brief = {k: summary[k] for k in keys if k in summary}
    print(json.dumps(brief))
    print(f"wrote {cfg.out}/summary.json, results.jsonl, report.md and plots")
