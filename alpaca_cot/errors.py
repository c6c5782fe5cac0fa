"""Errors caused by what the user passed: scripts print them as one line, without a traceback."""


class UserError(ValueError):
    """A wrong flag, file or record; the message says what to pass instead."""
