"""The wheel: one top-level name (``draftsmith``), the recipes and the question set inside, the console scripts
declared; and an installed command that runs from another directory (it finds its configs in the package)."""

from __future__ import annotations

import configparser
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"draftsmith-train", "draftsmith-data", "draftsmith-eval", "draftsmith-export"}
# what a checkout holds besides the source: never part of a build
NOT_SOURCE = (".venv", ".git", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built offline from a copy of the repository (a build writes build/ and *.egg-info beside the
    source, which must not land in the working tree)."""
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, root / "source", ignore=shutil.ignore_patterns(*NOT_SOURCE))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [*command, "-w", str(root / "dist"), str(root / "source")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = (root / "dist").glob("draftsmith-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_holds_one_top_level_name(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {name for name in top if not name.endswith((".dist-info", ".data"))} == {"draftsmith"}


def test_the_wheel_carries_every_recipe_and_the_question_set(wheel):
    names = set(wheel.namelist())
    recipes = {
        f"draftsmith/recipes/{path.relative_to(REPO / 'recipes')}" for path in (REPO / "recipes").rglob("*.yaml")
    }
    assert "draftsmith/recipes/config.yaml" in recipes and not recipes - names, sorted(recipes - names)
    assert "draftsmith/eval/question_sets/mini_specbench.jsonl" in names


def test_the_wheel_declares_the_console_scripts(wheel):
    (entry_points,) = (name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    scripts = dict(parser["console_scripts"])
    assert set(scripts) == SCRIPTS
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_an_installed_command_runs_from_another_directory(tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "draftsmith-eval"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "drafter:" in done.stdout
