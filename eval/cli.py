"""`draftsmith-eval` (`python -m eval` in the repository): evaluate one drafter against its target.

`draftsmith-eval drafter=NAME_OR_PATH target=NAME questions=FILE limit=N max_new_tokens=N temperature=T out=DIR`"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from draftsmith.drafters.errors import DraftsmithError, one_line_errors

PRIMARY_CONFIG = resources.files("draftsmith.recipes") / "eval.yaml"
# Served from the ConfigStore rather than the recipes/ search path: there `drafter` and `target` are config
# groups of the training recipes, and Hydra would read `drafter=ngram` as a group choice.
ConfigStore.instance().store(name="eval", node=OmegaConf.create(PRIMARY_CONFIG.read_text()))


def run(cfg: DictConfig) -> dict:
    from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions

    # questions first: a bad file is reported before the slow imports and the target load
    questions = load_questions(cfg.questions or DEFAULT_QUESTIONS)
    if cfg.limit is not None:
        if int(cfg.limit) < 1:
            raise DraftsmithError(f"limit must be >= 1 (or null for all), got {cfg.limit}")
        questions = questions[: int(cfg.limit)]
    import torch

    from draftsmith.drafters.target import load_target
    from draftsmith.eval.drift import greedy_turns
    from draftsmith.eval.loading import adapt_target, carries_adapter, load_drafter
    from draftsmith.eval.runner import evaluate

    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    target = load_target(str(cfg.target))
    tree_nodes = None if cfg.tree_nodes is None else int(cfg.tree_nodes)
    drafter = load_drafter(str(cfg.drafter), target, tree_nodes=tree_nodes, merge_adapter=False)
    original = None
    if carries_adapter(drafter):  # Medusa-2: the original target answers first, for the drift figures
        original = greedy_turns(target, questions, int(cfg.max_new_tokens))
        adapt_target(drafter, target)
    return evaluate(
        target,
        drafter,
        questions,
        max_new_tokens=int(cfg.max_new_tokens),
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
        seed=int(cfg.seed),
        out=Path(cfg.out),
        drafter_name=str(cfg.drafter),
        original=original,
    )


@hydra.main(version_base="1.3", config_path=None, config_name="eval")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        summary = run(cfg)
    keys = ("drafter", "target", "n_questions", "tau", "speedup", "lossless_mismatches", "adapter_drift")
    brief = {k: summary[k] for k in keys if k in summary}
    print(json.dumps(brief))
    print(f"wrote {cfg.out}/summary.json, results.jsonl, report.md and plots")
