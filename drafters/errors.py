"""One exception type for mistakes a user can fix: the CLIs print its message as one line and exit 2."""


class DraftsmithError(Exception):
    """Bad input or a missing resource; the message says what to fix."""
