"""vLLM serves an EAGLE-3 drafter in the speculators form drafters/engine_formats.py writes (`spec_compare` says
what is checked). Without ``DRAFTSMITH_VLLM_EAGLE3`` the drafter is a fresh one (it proves loading and
losslessness). With ``DRAFTSMITH_VLLM_EAGLE3=EXPORT`` (a trained EAGLE-3 export: its ``engines/speculators``
form, written here if the export lacks it) acceptance must match. The chain is ``ttt_steps`` long, the depth
the form tells vLLM to draft."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from spec_compare import compare_with_vllm

from draftsmith.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from draftsmith.drafters.engine_formats import write_speculators
from draftsmith.drafters.target import Target
from draftsmith.eval.loading import load_drafter

EXPORT_ENV = "DRAFTSMITH_VLLM_EAGLE3"


@pytest.fixture(scope="module")
def eagle3(real_target: Target, tmp_path_factory: pytest.TempPathFactory) -> tuple[Eagle3Drafter, Path, bool]:
    """The drafter (for draftsmith's engine), its speculators form, and whether it was trained."""
    folder = real_target.model.name_or_path
    export = os.environ.get(EXPORT_ENV)
    if export:
        drafter = load_drafter(export, real_target)
        form = Path(export) / "engines" / "speculators"
        if not (form / "config.json").is_file():
            form = write_speculators(drafter, tmp_path_factory.mktemp("form"), folder, real_target.model.config)
        return drafter, form, True
    drafter = Eagle3Drafter(Eagle3Config())
    drafter.bind(real_target.model)
    form = write_speculators(drafter.eval(), tmp_path_factory.mktemp("form"), folder, real_target.model.config)
    return drafter, form, False


def test_vllm_serves_the_speculators_eagle3_form_losslessly(
    real_target: Target, eagle3: tuple[Eagle3Drafter, Path, bool], tmp_path: Path
) -> None:
    drafter, form, trained = eagle3
    c = drafter.config
    chain = c.ttt_steps
    c.tree_topk, c.tree_depth, c.tree_nodes = 1, chain, chain  # a chain: the top token at each depth
    label = f"EAGLE-3 ({'trained: ' + os.environ[EXPORT_ENV] if trained else 'fresh drafter'})"
    compare_with_vllm(real_target, drafter, form, "eagle3", chain, label, trained, tmp_path)
