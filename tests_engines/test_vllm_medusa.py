"""vLLM serves a Medusa drafter in the form drafters/engine_formats.py writes (`spec_compare` says what is
checked). Without ``DRAFTSMITH_VLLM_MEDUSA`` the drafter is a fresh one (it proves loading and losslessness; its
heads repeat the target's next token, so few drafts pass). With ``DRAFTSMITH_VLLM_MEDUSA=EXPORT`` (a trained
Medusa export: its ``engines/vllm`` form, written here if the export lacks it) acceptance must match."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from spec_compare import compare_with_vllm

from draftsmith.drafters.engine_formats import write_vllm_medusa
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.target import Target
from draftsmith.eval.loading import load_drafter

EXPORT_ENV = "DRAFTSMITH_VLLM_MEDUSA"


@pytest.fixture(scope="module")
def medusa(real_target: Target, tmp_path_factory: pytest.TempPathFactory) -> tuple[MedusaDrafter, Path, bool]:
    """The drafter (for draftsmith's engine), its vLLM form, and whether it was trained."""
    export = os.environ.get(EXPORT_ENV)
    if export:
        drafter = load_drafter(export, real_target)
        form = Path(export) / "engines" / "vllm"
        if not (form / "config.json").is_file():
            form = write_vllm_medusa(drafter, tmp_path_factory.mktemp("form"), real_target.model, one_lm_head=True)
        return drafter, form, True
    drafter = MedusaDrafter(MedusaConfig(num_heads=3, num_layers=1))
    drafter.bind(real_target.model)
    form = write_vllm_medusa(drafter.eval(), tmp_path_factory.mktemp("form"), real_target.model, one_lm_head=True)
    return drafter, form, False


def test_vllm_serves_the_medusa_form_losslessly(
    real_target: Target, medusa: tuple[MedusaDrafter, Path, bool], tmp_path: Path
) -> None:
    drafter, form, trained = medusa
    chain = json.loads((form / "config.json").read_text())["num_heads"]
    drafter.set_tree([[0] * depth for depth in range(1, chain + 1)])  # each head's top token in turn
    label = f"Medusa ({'trained: ' + os.environ[EXPORT_ENV] if trained else 'fresh heads'})"
    compare_with_vllm(real_target, drafter, form, "medusa", chain, label, trained, tmp_path)
