"""The configs' one schema: the dataclasses in the ConfigStore type every key, the YAMLs state only what differs
from them, recipes compose, and bad input ends in one `error: ...` line and exit status 2 naming what to fix."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize, initialize_config_dir
from omegaconf import OmegaConf

from draftsmith.data.config import DataConfig
from draftsmith.drafters.base import drafter_kinds
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import TargetSpec
from draftsmith.training.pipeline import drafter_config
from draftsmith.training.settings import AcceptanceSettings, TrainSettings

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
GROUPS = ("target", "drafter", "data", "trainer", "eval")


def composed(config_name: str = "config", overrides: tuple[str, ...] = (), config_dir: Path = RECIPES) -> dict:
    with initialize_config_dir(version_base=None, config_dir=str(config_dir)):
        return OmegaConf.to_container(compose(config_name, overrides=list(overrides)), resolve=False)


def flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(config: dict, base: dict) -> dict[str, Any]:
    a, b = flat(config), flat(base)
    return {key: a.get(key) for key in sorted(set(a) | set(b)) if a.get(key, "<absent>") != b.get(key, "<absent>")}


# --- the YAMLs and the schema cannot drift apart


def group_yamls() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS for path in sorted((RECIPES / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "name"), group_yamls())
def test_a_group_yaml_states_only_what_differs_from_its_schema(group: str, name: str) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(RECIPES / group / f"{name}.yaml"))
    defaults = raw.pop("defaults", None)
    assert defaults is not None and len(defaults) == 2 and defaults[1] == "_self_", (
        f"{group}/{name}.yaml: start with `defaults: [base_..., _self_]` (its schema) or [ANOTHER_ONE, _self_]"
    )
    parent, seen = defaults[0], {name}
    while not parent.startswith("base_"):  # e.g. trainer/gpu -> cpu -> base_trainer
        assert parent not in seen, f"{group}/{name}.yaml: its defaults chain loops"
        seen.add(parent)
        parent = OmegaConf.load(RECIPES / group / f"{parent}.yaml").defaults[0]
    inherited = composed(f"{group}/{defaults[0]}")[group]

    def check(stated: dict, base: dict, where: str) -> None:
        for key, value in stated.items():
            assert key in base, f"{group}/{name}.yaml: {where}{key} is not a field of its schema"
            if isinstance(value, dict) and isinstance(base[key], dict):
                check(value, base[key], f"{where}{key}.")
            else:
                assert value != base[key], f"{group}/{name}.yaml: {where}{key}={value!r} is inherited already: drop it"

    check(raw, inherited, "")


def test_every_drafter_kind_has_a_schema() -> None:
    for kind in drafter_kinds():
        assert composed(f"drafter/base_{kind}")["drafter"]["kind"] == kind


# --- recipes compose, and the derived ones to what they were before they derived


def recipes() -> list[str]:
    return sorted(path.stem for path in (RECIPES / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", recipes())
def test_every_recipe_composes_to_valid_settings(recipe: str) -> None:
    config = composed(overrides=(f"recipe={recipe}",))
    assert config["recipe_name"] == recipe
    TargetSpec.from_any(config["target"])
    drafter_config(config["drafter"])
    DataConfig.from_mapping({**config["data"], "prompts": config["data"]["prompts"] or "prompts.jsonl"})
    TrainSettings.from_config(config["trainer"])
    AcceptanceSettings.from_config(config["eval"])


# What each derived recipe differed by from its base before it was written as one (the composed configs of every
# recipe were compared before and after the change to typed configs: the same).
DERIVED = {
    ("amphista_vicuna13b", "amphista_vicuna7b"): {
        "recipe_name": "amphista_vicuna13b",
        "target.name": "vicuna-13b-v1.3",
        "target.source": "lmsys/vicuna-13b-v1.3",
        "trainer.accumulate_grad_batches": 8,
        "trainer.batch_size": 4,
    },
    ("amphista_vicuna33b", "amphista_vicuna7b"): {
        "recipe_name": "amphista_vicuna33b",
        "target.name": "vicuna-33b-v1.3",
        "target.source": "lmsys/vicuna-33b-v1.3",
        "trainer.accumulate_grad_batches": 16,
        "trainer.batch_size": 2,
        "trainer.zero_stage": 3,
    },
    ("medusa2_smollm2", "medusa_smollm2"): {
        "data.synth.n": 400,
        "drafter.distill_weight": 5.0,
        "drafter.heads_warmup_steps": 48,
        "drafter.lora_lr": 2e-4,
        "drafter.lora_rank": 8,
        "recipe_name": "medusa2_smollm2",
        "trainer.lr": 1e-3,
    },
}


@pytest.mark.parametrize(("recipe", "base"), list(DERIVED))
def test_a_derived_recipe_differs_from_its_base_as_before(recipe: str, base: str) -> None:
    assert f"- {base}" in (RECIPES / "recipe" / f"{recipe}.yaml").read_text()  # it is written as a derivation
    got = differences(composed(overrides=(f"recipe={recipe}",)), composed(overrides=(f"recipe={base}",)))
    assert got == DERIVED[recipe, base]


def test_the_vicuna_recipes_keep_their_settings() -> None:
    config = flat(composed(overrides=("recipe=amphista_vicuna7b",)))
    expected = {
        "target.name": "vicuna-7b-v1.3",
        "target.revision": "main",
        "target.chat_template": "vicuna",
        "drafter.kind": "amphista",
        "drafter.num_heads": 5,
        "drafter.tree_nodes": 63,
        "data.prompts": None,
        "data.max_new_tokens": 1024,
        "data.batch_size": 64,
        "data.shard_rows": 1024,
        "trainer.strategy": "deepspeed",
        "trainer.zero_stage": 2,
        "trainer.devices": 8,
        "trainer.precision": "bf16-mixed",
        "trainer.max_epochs": 2,
        "trainer.batch_size": 8,
        "trainer.accumulate_grad_batches": 4,
        "trainer.lr": 1e-3,
        "trainer.warmup_steps": 50,
        "trainer.max_length": 2048,
        "trainer.checkpoint_every_n_steps": 100,
        "eval.limit": None,
        "eval.max_new_tokens": 512,
        "publish.repo_id": None,
        "publish.private": True,
    }
    assert {key: config[key] for key in expected} == expected


# --- typed composition names the key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.bogus=1", "trainer.bogus"),
        ("drafter.bogus=1", "drafter.bogus"),
        ("data.synth.bogus=1", "data.synth.bogus"),
        ("trainer.lr=abc", "trainer.lr"),
        ("drafter.num_heads=many", "drafter.num_heads"),
        ("resume=maybe", "resume"),
    ],
)
def test_composition_refuses_unknown_keys_and_wrong_types(override: str, message: str) -> None:
    from hydra.errors import ConfigCompositionException

    from draftsmith.drafters.errors import config_error

    with pytest.raises(ConfigCompositionException) as err:
        composed(overrides=(override,))
    assert message in config_error(err.value)


def test_settings_check_ranges_and_unknown_keys_naming_the_key() -> None:
    with pytest.raises(DraftsmithError, match="trainer.lr=0.0: must be positive"):
        TrainSettings.from_config({"lr": 0.0})
    with pytest.raises(DraftsmithError, match="unknown trainer key.*bogus"):
        TrainSettings.from_config({"bogus": 1})
    with pytest.raises(DraftsmithError, match="eval.keep must be one of"):
        AcceptanceSettings.from_config({"keep": "newest"})
    with pytest.raises(DraftsmithError, match="unknown eval key.*bogus"):
        AcceptanceSettings.from_config({"bogus": 1})


# --- the command lines: one `error: ...` line, exit status 2


def run_main(main: Callable[[], Any], args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str]:
    """``main()`` with these command-line arguments, in this process: its exit status and its stderr."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert "HYDRA_FULL_ERROR" not in os.environ  # set only while Hydra composes
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.bogus=1"], "error: unknown key trainer.bogus; known keys there: accelerator, "),
        (["trainer.lr=abc"], "error: trainer.lr='abc': Value 'abc' of type 'str' could not be converted to Float"),
        (["recipe=nope"], "error: recipe=nope: there is no such recipe config; available: amphista_smollm2, "),
        (["trainer=nope"], "error: trainer=nope: there is no such trainer config; available: cpu, "),
        (["+trainer.bogus=1"], "error: unknown trainer key(s) bogus; known: "),  # forced in: the settings refuse it
        (["trainer.lr=["], "error: no viable alternative at input '['"),
    ],
)
def test_train_cli_mistakes_are_one_line(args, message, tmp_path, monkeypatch, capsys) -> None:
    from draftsmith.training.cli import main

    code, err = run_main(main, [*args, f"out={tmp_path}"], monkeypatch, capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(message)


def test_a_recipe_yaml_that_does_not_parse_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from draftsmith.training.cli import main

    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "broken.yaml").write_text("# @package _global_\ntrainer:\n  lr: [1, 2\n")
    code, err = run_main(main, ["--config-dir", str(tmp_path), "recipe=broken"], monkeypatch, capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'recipe' / 'broken.yaml'}: line 4: not valid YAML")


def test_a_recipe_with_a_wrong_type_names_the_key_and_the_file(tmp_path, monkeypatch, capsys) -> None:
    from draftsmith.training.cli import main

    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "typo.yaml").write_text("# @package _global_\nrecipe_name: typo\ntrainer:\n  lr: fast\n")
    code, err = run_main(main, ["--config-dir", str(tmp_path), "recipe=typo"], monkeypatch, capsys)
    assert code == 2
    expected = "error: trainer.lr='fast' (in recipe/typo): Value 'fast' of type 'str' could not be converted to Float"
    assert err.strip() == expected


def test_data_cli_mistakes_are_one_line(tmp_path, monkeypatch, capsys) -> None:
    from draftsmith.data.cli import main

    code, err = run_main(main, ["data.synth.n=lots", f"out={tmp_path}"], monkeypatch, capsys)
    assert code == 2
    assert err.strip().startswith("error: data.synth.n='lots': Value 'lots' of type 'str' could not be converted")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["limit=abc"], "error: limit='abc': Value 'abc' of type 'str' could not be converted to Integer"),
        (["bogus=1"], "error: unknown key bogus; known keys there: drafter, target, questions, limit, max_new_tokens"),
        (["limit=0"], "error: limit=0: must be >= 1 (or null)"),
        (["top_p=0"], "error: top_p=0.0: must be in (0, 1]"),
        (["max_new_tokens=0"], "error: max_new_tokens=0: must be >= 1"),
        (["dtype=float8"], "error: dtype=float8: use float32, bfloat16, float16, auto or null"),
    ],
)
def test_eval_cli_mistakes_are_one_line(args, message, tmp_path, monkeypatch, capsys) -> None:
    from draftsmith.eval.cli import main

    code, err = run_main(main, [*args, f"out={tmp_path}"], monkeypatch, capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(message)


def test_eval_cli_keys_and_defaults() -> None:
    import draftsmith.eval.cli  # noqa: F401 - stores the eval primary config
    from draftsmith.eval.config import EvalConfig

    with initialize(version_base="1.3", config_path=None):
        config = OmegaConf.to_container(compose("eval"))
    assert config == {
        "drafter": "ngram",
        "target": "smollm2-135m-instruct",
        "questions": None,
        "limit": None,
        "max_new_tokens": 128,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "tree_nodes": "auto",
        "threads": None,
        "dtype": None,
        "out": "outputs/eval",
        "profile": False,
        "refresh": False,
        "drafter_set": {},
    }
    assert dataclasses.asdict(EvalConfig.from_config(config)) == config
    with initialize(version_base="1.3", config_path=None):
        changed = compose("eval", overrides=["drafter_set={path_search: true, length_min: 2}"])
    assert EvalConfig.from_config(changed).drafter_set == {"path_search": True, "length_min": 2}


def test_an_unknown_recipe_from_the_shell_is_one_line_and_exit_2(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "train.py", "recipe=nope", f"out={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: recipe=nope: there is no such recipe config; available: ")
    assert "amphista_vicuna7b" in line
