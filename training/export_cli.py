"""`draftsmith-export EXPORT_DIR --to vllm|speculators|sglang [--out DIR] [--target NAME_OR_FOLDER]`: write an
existing export in the form a serving engine loads, and print the command that serves it.

A command line of a folder and two flags rather than Hydra's ``key=value``: it runs no recipe. Like the other
commands, a user's mistake ends in one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import OmegaConf

from draftsmith.drafters.base import drafter_class, read_export_config
from draftsmith.drafters.engine_formats import write_engine_forms
from draftsmith.drafters.errors import DraftsmithError, one_line_errors, writable_folder
from draftsmith.drafters.target import Target, TargetSpec, load_target
from draftsmith.eval.loading import load_drafter
from draftsmith.training.export import refresh_model_card
from draftsmith.training.serving import ENGINES, FORM_ENGINES, engine_form, serving_command


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse prints its usage before the error; the house way is the error line alone."""
        print(f"error: {message} (draftsmith-export --help shows the usage)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    cli = OneLineParser(prog="draftsmith-export", description=__doc__.split("\n\n")[0])
    cli.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="an export folder (OUT/export of a run)")
    cli.add_argument("--to", required=True, choices=ENGINES, help="the engine that will load the drafter")
    cli.add_argument("--out", type=Path, help="where to write that form (default: EXPORT_DIR/engines/FORM)")
    cli.add_argument("--target", help="the target preset, folder or Hub id (default: the one the export names)")
    return cli


def target_spec(export_dir: Path, config: dict[str, Any], target: str | None) -> TargetSpec:
    """What to load as the target: ``--target``, else the recipe the export was trained with, else the name its
    config.json records (a preset)."""
    if target:
        return TargetSpec.from_any(target)
    recipe = export_dir / "recipe.yaml"
    recorded = OmegaConf.select(OmegaConf.load(recipe), "target") if recipe.is_file() else None
    if recorded is not None:
        return TargetSpec.from_any(OmegaConf.to_container(recorded, resolve=True))
    name = (config.get("target") or {}).get("name")
    if not name:
        raise DraftsmithError(f"{export_dir} names no target (no recipe.yaml): pass --target NAME_OR_FOLDER")
    return TargetSpec.from_any(name)


def requested_form(export_dir: Path, engine: str) -> tuple[dict[str, Any], str]:
    """The export's config.json and the form ``engine`` loads its drafter in: a refusal comes before any loading."""
    if not export_dir.is_dir():
        raise DraftsmithError(f"{export_dir} is not a folder: pass an export folder (a run writes OUT/export)")
    config = read_export_config(export_dir)
    settings = dict(config["drafter"])
    kind_cls = drafter_class(str(settings.pop("kind", None)))
    return config, engine_form(kind_cls.config_class.from_dict(settings), engine)


def write_form(export_dir: Path, form: str, target: Target, folder: Path, target_name: str) -> list[str]:
    """Write the drafter of ``export_dir``, loaded against ``target``, in ``form`` to ``folder``; returns the lines
    to print. ``target_name``: the target's Hub id or folder, as the engine is to load it."""
    drafter = load_drafter(export_dir, target)  # refuses a target other than the one it was trained for
    # written beside the destination, then moved into place: a folder that is there is whole
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_engine_forms(drafter, staging, target.model, target_name, [form])
    if folder.exists():
        shutil.rmtree(folder)
    (staging / form).rename(folder)
    staging.rmdir()
    lines = [f"wrote {folder}: the {drafter.config.kind} drafter in the {form} form"]
    if folder.parent == export_dir / "engines":
        lines.append(f"updated {refresh_model_card(export_dir, drafter)}: its Serving engines section")
    command = serving_command(form, drafter.config, str(folder), target_name)
    return [*lines, f"serve it ({' and '.join(FORM_ENGINES[form])}): {command}"]


def export_for_engine(export_dir: Path, engine: str, out: Path | None = None, target: str | None = None) -> str:
    """`draftsmith-export`: the form ``engine`` loads, checked, then written against the export's target."""
    config, form = requested_form(export_dir, engine)
    folder = out or export_dir / "engines" / form
    writable_folder(folder, "--out")
    spec = target_spec(export_dir, config, target)
    return "\n".join(write_form(export_dir, form, load_target(spec), folder, spec.source or spec.name))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with one_line_errors():
        print(export_for_engine(args.export_dir, args.to, args.out, args.target))
