"""SIGINT/SIGTERM handling shared by every long-running command.

One place says which signals mean "stop" and puts the previous handlers back when
the work is done, so a command run from Python (tests, `goleash run`'s pieces)
leaves the interpreter as it found it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StopRequest(threading.Event):
    """Set by SIGINT or SIGTERM; `why` names the signal ("SIGTERM"), "" until then."""

    def __init__(self) -> None:
        super().__init__()
        self.why = ""


@contextmanager
def stop_signals_handled_by(handler: Handler) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` inside the block; the old handlers after it."""
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """`with stop_on_signals() as stop:` the block polls or waits on `stop`."""
    stop = StopRequest()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.why = signal.Signals(signum).name
        stop.set()

    with stop_signals_handled_by(on_signal):
        yield stop


def ignore_stop_signals() -> None:
    """From here on SIGINT/SIGTERM do nothing (a clean-up that a second Ctrl-C must
    not cut short); an enclosing `stop_signals_handled_by` restores them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
