"""The one SIGINT/SIGTERM helper: a real signal to this process stops the block,
and the handlers in place before it are back afterwards."""

from __future__ import annotations

import os
import signal

import pytest

from goleash.signals import ignore_stop_signals, stop_on_signals, stop_signals_handled_by


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_sets_the_request_and_names_it(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as stop:
        assert not stop.is_set() and stop.why == ""
        os.kill(os.getpid(), sig)  # the handler runs before kill() returns to Python
        assert stop.wait(5)
        assert stop.why == sig.name
    assert {s: signal.getsignal(s) for s in before} == before


def test_handlers_are_restored_when_the_block_raises() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), stop_on_signals():
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before


def test_ignoring_inside_a_handled_block_lasts_until_the_block_ends() -> None:
    seen: list[int] = []
    before = signal.getsignal(signal.SIGINT)
    with stop_signals_handled_by(lambda signum, _frame: seen.append(signum)):
        os.kill(os.getpid(), signal.SIGINT)
        ignore_stop_signals()
        os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt, not seen
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) == before
