"""Argument types every `goleash` subcommand shares: nonsense is refused while the
command line is parsed (argparse prints one line and exits 2), before any work.

float("nan"), float("inf") and "1e400" all parse as floats; a duration, interval or
budget that is not a finite positive number would only fail later, and less clearly
(a loop that never sleeps, a wait that never ends).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

MAX_SECONDS = 366 * 24 * 3600.0  # a year: longer is a typo, and overflows some waits
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seconds(text: str) -> float:
    """A duration or interval: a finite number of seconds, more than zero."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: more than a year of seconds")
    return value


def seconds_or_zero(text: str) -> float:
    """Seconds where 0 has a meaning of its own (e.g. "no minimum", "until cleared")."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: more than a year of seconds")
    return value


def budget(text: str) -> float:
    """A share of one CPU core: more than 0, at most 1 (0.01 is 1%)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a share of one core, more than 0 and at most 1 (0.01 = 1%)"
        )
    return value


def pid(text: str) -> int:
    """A process id: a positive integer within Linux's range."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if not 0 < value <= MAX_PID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return value


def address(text: str) -> int:
    """A code address: hex with 0x, or decimal; 64 bits at most."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (e.g. 0x4a1b2c)") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-bit address")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Refuses a bad command line with one line on stderr (and exit 2), not the usage
    block: the line names the argument and why; --help shows the rest."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
