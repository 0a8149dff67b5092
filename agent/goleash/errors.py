"""Errors a user can act on. The CLI prints the message and exits with `exit_code`."""

from __future__ import annotations


class GoleashError(Exception):
    """Base of every error goleash reports to a user instead of a traceback."""

    exit_code = 2


class StageFailure(Exception):
    """An unexpected failure in one named step of handling one process (reading its
    goroutines, walking stacks, ...), raised so the agent can count it by stage.
    The original exception is `cause` (and __cause__)."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


def printable(text: str) -> str:
    """Text from another process or a binary, safe for a terminal or a log line:
    control characters (escape sequences, carriage returns, newlines) escaped."""
    if text.isprintable():
        return text  # the common case, without a loop in Python
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
