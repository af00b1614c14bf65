"""The one exception type users see as a one-line message (exit status 2)."""


class UserError(Exception):
    """Bad input from the user: an option, a file, a model name.

    The CLI prints ``str(error)`` on one line and exits with status 2; no
    traceback, because the fix is on the user's side and the message says it.
    """
