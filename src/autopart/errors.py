"""Errors that reach the user.

Every error autopart raises on bad input derives from `AutopartError`, so the CLI can print
its message alone (no traceback) and library users can catch one type.  Messages say what is
wrong and what to do about it.
"""


class AutopartError(Exception):
    """Base class of the errors autopart reports to users."""


class CaptureError(AutopartError):
    """A model could not be captured into the graph IR; the message names the op and module."""
