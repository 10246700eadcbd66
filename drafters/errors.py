"""One exception type for mistakes a user can fix, and how the command-line entry points report them."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class DraftsmithError(Exception):
    """Bad input or a missing resource; the message says what to fix."""


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a user's mistake into one `error: ...` line on stderr and exit code 2, with no traceback."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except DraftsmithError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except MissingMandatoryValue as err:  # a recipe's `???`, e.g. the ShareGPT file of the Vicuna recipes
        print(f"error: {err.full_key} has no value: give it on the command line ({err.full_key}=...)", file=sys.stderr)
        sys.exit(2)


def config_error(err: BaseException) -> str:
    """One line saying what to fix in a config Hydra could not compose: a config that is not there, an unknown
    key, a wrong type, a YAML that does not parse."""
    import re

    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
    from yaml import MarkedYAMLError

    where = re.match(r"In '([^']+)': \w+ raised while composing", str(err))  # the YAML a merge failed in
    cause = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OmegaConfBaseException)), None)
    if cause is not None and getattr(cause, "full_key", None):
        suffix = f" (in {where.group(1)})" if where else ""
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.parent_node is not None:
            known = ", ".join(str(key) for key in cause.parent_node if key != "hydra")
            return f"unknown key {cause.full_key}{suffix}; known keys there: {known}"
        detail = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        value = getattr(cause, "value", None)
        return f"{cause.full_key}{'' if value is None else f'={value!r}'}{suffix}: {detail}"
    parse = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, MarkedYAMLError)), None)
    if parse is not None and parse.problem_mark is not None:
        mark, problem = parse.problem_mark, ", ".join(filter(None, [parse.context, parse.problem]))
        return f"{mark.name}: line {mark.line + 1}: not valid YAML ({problem})"
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
    if isinstance(err, MissingConfigException) and missing:
        group, name = missing.groups()
        options = [option for option in err.options or [] if not option.startswith("base_")]  # not the schemas
        return f"{group}={name}: there is no such {group} config; available: {', '.join(options) or 'none'}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    return "; ".join(lines)


def hydra_cli(**hydra_main: Any) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """`hydra.main(**hydra_main)`, except that a config Hydra cannot compose ends in one `error: ...` line on
    stderr and exit code 2 (as `one_line_errors` does for the task's own mistakes), not Hydra's multi-line report.

    Hydra re-raises its errors instead of reporting them while HYDRA_FULL_ERROR=1 (its documented switch for a
    complete stack trace): set here until the task starts, so a failure in the task itself is reported the
    usual way. A user who sets HYDRA_FULL_ERROR gets Hydra's full trace for config errors too."""
    import hydra

    def decorator(task: Callable[[Any], Any]) -> Callable[..., Any]:
        state: dict[str, Any] = {}

        def restore() -> None:
            if state["user"] is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = state["user"]

        @functools.wraps(task)  # Hydra names the job (and finds the calling module) by the task function
        def run_task(cfg: Any) -> Any:
            state["started"] = True
            restore()
            return task(cfg)

        composed_main = hydra.main(**hydra_main)(run_task)

        @functools.wraps(task)
        def main(*args: Any) -> Any:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException
            from yaml import YAMLError

            state.update(user=os.environ.get("HYDRA_FULL_ERROR"), started=False)
            if state["user"] is None:
                os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return composed_main(*args)
            except (HydraException, OmegaConfBaseException, YAMLError) as err:
                if state["user"] is not None or state["started"]:
                    raise
                print(f"error: {config_error(err)}", file=sys.stderr)
                sys.exit(2)
            finally:
                restore()

        return main

    return decorator


def writable_folder(path: str | Path, key: str) -> Path:
    """``path`` as a folder a run can write into (it need not exist yet); else a DraftsmithError naming ``key``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DraftsmithError(f"{key}={path} exists as a file: pass a folder path")
    existing = path
    while not existing.exists():  # the nearest part of the path that is already there
        existing = existing.parent
    if not existing.is_dir():
        raise DraftsmithError(f"{key}={path} cannot be made: {existing} is a file, not a folder; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DraftsmithError(f"{key}={path} cannot be written: {existing} is read-only; pass a folder you may write")
    return path


class OutFolderCheck(Callback):
    """Hydra callback (``hydra.callbacks``): refuse an unusable run folder (``hydra.run.dir``, which is ``${out}``)
    in one line, before Hydra itself makes it and fails with a traceback."""

    def __init__(self, key: str = "out") -> None:
        self.key = key

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        with one_line_errors():
            writable_folder(str(config.hydra.run.dir), self.key)
