"""Errors that the CLI reports as one line instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a config value), not a bug.

    The CLI prints ``error: <message>`` on one line and exits with :attr:`exit_code`.
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
