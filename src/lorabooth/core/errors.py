"""The one exception type users see as a one-line message (exit status 2)."""

from .visible import visible


class UserError(Exception):
    """Bad input from the user: an option, a file, a model name.

    The CLI prints ``str(error)`` on one line and exits with status 2; no
    traceback, because the fix is on the user's side and the message says it.
    The message quotes prompts, paths and file contents: their control
    characters (a line break too) are shown escaped, so it stays one line.
    """

    def __str__(self) -> str:
        return visible(super().__str__())


def first_line(error: BaseException, limit: int = 160) -> str:
    """A library exception's first line (at most ``limit`` characters), or its
    type's name when it has no message: what a one-line error can quote."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
