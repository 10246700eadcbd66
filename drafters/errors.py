"""One exception type for mistakes a user can fix, and how the command-line entry points report them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


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
