"""Errors a user can cause: the CLI prints them as one line and exits non-zero.

Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from a user: missing file, malformed line, impossible layout, unknown key."""


class AgreedError(UserError):
    """A UserError every rank of a job raises alike, at the same point (it is decided on values all
    ranks share, or on rank 0 and broadcast): one rank reports it."""
