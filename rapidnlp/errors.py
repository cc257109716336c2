"""Errors a user can cause: the CLI prints them as one line and exits non-zero.

Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from a user: missing file, malformed line, impossible layout, unknown key."""
