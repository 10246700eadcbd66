"""Which serving engine loads which drafter, from which engine form (`drafters.engine_formats`), with which
settings; and for a drafter no engine serves, the closest route there is.

The settings are the engines' documented ones: vLLM's ``--speculative-config`` JSON (``method``, ``model``,
``num_speculative_tokens``; vLLM's speculative decoding guide and the speculators "Serve in vLLM" tutorial) and
SGLang's server flags (``--speculative-algorithm EAGLE3``, ``--speculative-draft-model-path``,
``--speculative-num-steps``, ``--speculative-eagle-topk``, ``--speculative-num-draft-tokens``; SGLang's
speculative decoding guide).
"""

from __future__ import annotations

import json

from draftsmith.drafters.base import DrafterConfig
from draftsmith.drafters.engine_formats import ENGINE_FORMS, engine_forms
from draftsmith.drafters.errors import DraftsmithError

ENGINES = ("vllm", "speculators", "sglang")
# The engines that load each form: vLLM reads the speculators form of EAGLE-3 (its speculators config adapter).
FORM_ENGINES = {"vllm": ("vllm",), "speculators": ("vllm", "speculators"), "sglang": ("sglang",)}
TRAINED_ROUTE = "train medusa (vLLM) or eagle3 (vLLM, SGLang) on this target"
# For a kind with no engine form at all: what comes closest.
CLOSEST_ROUTE = {
    "amphista": f"none, no engine implements Amphista's heads; {TRAINED_ROUTE}",
    "parallelspec": "none, no engine implements ParallelSpec's mask-token drafting; train eagle3 (the same "
    "backbone, one token per forward) for vLLM or SGLang",
    "layerskip": f"none, no engine implements layer-skip self-speculation; {TRAINED_ROUTE}",
    "deer": f"none, no engine implements DEER's diffusion drafting; {TRAINED_ROUTE}",
    "ngram": "nothing to export, vLLM drafts n-grams itself: "
    '--speculative-config \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\' '
    "(SGLang: --speculative-algorithm NGRAM)",
    "ar": "nothing to export, plain decoding is the target alone",
}


def closest_route(config: DrafterConfig) -> str:
    """Where to go instead, for a drafter of ``config`` that an engine cannot serve."""
    forms = engine_forms(config, ["auto"])
    if forms:
        engines = sorted({engine for form in forms for engine in FORM_ENGINES[form]})
        return f"export it --to {' or --to '.join(engines)}"
    if getattr(config, "adapts_target", False):
        return (
            "none, engines would run the original target, not the adapted one these heads learned; "
            "train Medusa-1 (drafter.lora_rank=0) for vLLM"
        )
    if config.kind in ENGINE_FORMS:
        return f"none with these settings; train a {config.kind} drafter with its default settings"
    return CLOSEST_ROUTE.get(config.kind, f"none; {TRAINED_ROUTE}")


def engine_form(config: DrafterConfig, engine: str) -> str:
    """The form (``engines/NAME``) in which ``engine`` loads a drafter of ``config``; else one error line that
    names the closest route."""
    if engine not in ENGINES:
        raise DraftsmithError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    for form in engine_forms(config, ["auto"]):
        if engine in FORM_ENGINES[form]:
            return form
    route = closest_route(config)
    raise DraftsmithError(f"{engine} cannot serve a {config.kind} drafter; closest engine route: {route}")


def serving_command(form: str, config: DrafterConfig, draft_path: str, target: str) -> str:
    """The command that serves ``target`` with the drafter written in ``form`` at ``draft_path``.

    vLLM drafts a chain of ``num_speculative_tokens``: one per Medusa head, and EAGLE-3's trained depth
    (``ttt_steps``, which the speculators config also records). SGLang drafts EAGLE-2's dynamic tree, with
    draftsmith's tree shape: depth, top-k per node, and the verified tokens (the draft nodes plus the root)."""
    if form == "sglang":
        return (
            f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path {draft_path} --speculative-num-steps {config.tree_depth} "
            f"--speculative-eagle-topk {config.tree_topk} --speculative-num-draft-tokens {config.tree_nodes + 1}"
        )
    method, tokens = ("medusa", config.num_heads) if form == "vllm" else ("eagle3", config.ttt_steps)
    settings = {"method": method, "model": draft_path, "num_speculative_tokens": tokens}
    return f"vllm serve {target} --speculative-config '{json.dumps(settings)}'"
