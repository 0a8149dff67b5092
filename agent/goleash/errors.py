"""Errors a user can act on. The CLI prints the message and exits with `exit_code`."""

from __future__ import annotations


class GoleashError(Exception):
    """Base of every error goleash reports to a user instead of a traceback."""

    exit_code = 2
