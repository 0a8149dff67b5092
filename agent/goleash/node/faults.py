"""Fault isolation for the agent's processes: each failure counted by stage and logged
once, an attach retried with backoff, a process given up on marked untraceable."""

from __future__ import annotations

import logging
import time
from collections import Counter

from goleash.errors import GoleashError, StageFailure, printable
from goleash.gobin.errors import (
    NotELFError,
    NotGoError,
    OffsetsUnavailableError,
    ProcessError,
    UnsupportedGoVersionError,
)
from goleash.node.discovery import Candidate, Discovery
from goleash.node.sender import BatchBuffer
from goleash.probes.procmem import process_state, start_time

log = logging.getLogger("goleash.agent")

ATTACH_ATTEMPTS = 3  # a process that keeps failing transiently is given up after these
# A process whose handling fails unexpectedly this many times (any stage) is left
# alone until its executable changes; before that, attaching is retried with backoff.
MAX_PROCESS_FAILURES = 3
RETRY_BACKOFF_S = 2.0  # doubled after each failure
STAGES = ("judge", "attach", "snapshot", "inventory", "stacks", "latency", "export", "detach")
_MAX_LOGGED = 10_000  # (process, stage) pairs whose first failure was logged
ERROR_DROP_PREFIX = "process_errors_"

Key = tuple[int, int]  # (pid, start time in ticks): one process, never a reused PID


def untraceable_kind(exc: BaseException) -> str:
    if isinstance(exc, UnsupportedGoVersionError):
        return "go_version"
    if isinstance(exc, NotGoError | NotELFError):
        return "not_go"
    if isinstance(exc, OffsetsUnavailableError):
        return "offsets_unknown"
    if isinstance(exc, ProcessError):
        return "unreadable"
    if not isinstance(exc, GoleashError):
        return "errors"
    return "other"


def alive(pid: int, start_ticks: int) -> bool:
    """The process (pid, start) still runs: not exited, reaped, reused or a zombie."""
    return start_time(pid) == start_ticks and process_state(pid) not in (None, "Z", "X")


class ProcessFaults:
    """What went wrong with which process, and what the agent does about it. Failures
    by stage (for /metrics and the control plane), by process (to give up on one), and
    when a failed process may be tried again; the discovery is told to judge a process
    again later, or to forget it."""

    def __init__(self, discovery: Discovery, buffer: BatchBuffer) -> None:
        self.discovery = discovery
        self.buffer = buffer
        self.process_errors: Counter[str] = Counter()
        self.untraceable: dict[Key, str] = {}  # (pid, start) -> kind
        # replaced whole, never changed in place: the metrics thread reads it
        self.untraceable_counts: dict[str, int] = {}
        self.attempts: Counter[Key] = Counter()  # transient attach failures
        self.failures: Counter[Key] = Counter()  # unexpected failures, any stage
        self.retry_at: dict[Key, float] = {}
        self._logged: set[tuple[Key, str]] = set()

    def fault(self, stage: str, pid: int, exe: str, exc: BaseException, key: Key) -> None:
        """Count one failure of one process's handling, and log the first per stage."""
        if isinstance(exc, StageFailure):
            stage, exc = exc.stage, exc.cause
        self.process_errors[stage] += 1
        # Reaches the control plane in the next batch's agent-level drops.
        self.buffer.count_drop(f"{ERROR_DROP_PREFIX}{stage}")
        if (key, stage) in self._logged:
            log.debug("PID %d: %s failed again: %r", pid, stage, exc)
            return
        if len(self._logged) >= _MAX_LOGGED:
            self._logged.clear()
        self._logged.add((key, stage))
        log.warning(
            "PID %d (%s): %s failed: %s: %s (this process only; counted in "
            "goleash_agent_process_errors_total)",
            pid,
            printable(exe),
            stage,
            type(exc).__name__,
            printable(str(exc))[:300],
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )

    def judge_failed(self, pid: int, exe: str, exc: BaseException, key: Key) -> None:
        self.fault("judge", pid, exe, exc, key)

    def backing_off(self, c: Candidate) -> bool:
        """C failed before and its backoff has not passed: judged again later."""
        retry_at = self.retry_at.get(c.key)
        if retry_at is not None and time.monotonic() < retry_at:
            self.discovery.forget(c.pid, retry=True)
            return True
        return False

    def failed(self, c: Candidate, stage: str, exc: BaseException) -> None:
        """An unexpected failure while attaching to C: retried later with backoff,
        given up after MAX_PROCESS_FAILURES, forgotten quietly if C is gone."""
        self.fault(stage, c.pid, c.exe, exc, c.key)
        if not alive(c.pid, c.start_ticks):
            self.forget_key(c.key)
            self.discovery.forget(c.pid)
            return
        self.failures[c.key] += 1
        n = self.failures[c.key]
        if n >= MAX_PROCESS_FAILURES:
            self.retry_at.pop(c.key, None)
            self.mark_untraceable(c, exc)
        else:
            self.retry_at[c.key] = time.monotonic() + RETRY_BACKOFF_S * 2 ** (n - 1)
            self.discovery.forget(c.pid, retry=True)

    def failed_again(self, stage: str, pid: int, exe: str, exc: BaseException, key: Key) -> bool:
        """An unexpected failure of a followed process; True when it is one too many
        (the caller stops following it, then calls gave_up)."""
        self.fault(stage, pid, exe, exc, key)
        self.failures[key] += 1
        return self.failures[key] >= MAX_PROCESS_FAILURES

    def gave_up(self, key: Key) -> None:
        self.untraceable[key] = "errors"
        self.untraceable_counts = dict(Counter(self.untraceable.values()))

    def retry_or_give_up(self, c: Candidate, exc: ProcessError) -> None:
        """C could not be read yet (young processes: runtime not up): tried again at
        the next scan, up to ATTACH_ATTEMPTS times."""
        self.attempts[c.key] += 1
        if not alive(c.pid, c.start_ticks):
            self.attempts.pop(c.key, None)
            self.discovery.forget(c.pid)
        elif self.attempts[c.key] >= ATTACH_ATTEMPTS:
            self.mark_untraceable(c, exc)
        else:
            self.discovery.forget(c.pid, retry=True)

    def attached(self, key: Key) -> None:
        self.attempts.pop(key, None)
        self.retry_at.pop(key, None)

    def forget_key(self, key: Key) -> None:
        self.attempts.pop(key, None)
        self.failures.pop(key, None)
        self.retry_at.pop(key, None)

    def mark_untraceable(self, c: Candidate, exc: BaseException) -> None:
        kind = untraceable_kind(exc)
        if c.key not in self.untraceable:
            log.warning("not tracing PID %d (%s): %s", c.pid, printable(c.exe), exc)
        self.untraceable[c.key] = kind
        self.failures.pop(c.key, None)
        self.untraceable_counts = dict(Counter(self.untraceable.values()))
        self.attempts.pop(c.key, None)
        self.discovery.forget(c.pid)

    def forget_vanished(self) -> None:
        """Processes that could not be traced (or were waiting for a retry) and exited."""
        gone = [k for k in (*self.untraceable, *self.attempts) if start_time(k[0]) != k[1]]
        gone += [k for k in (*self.failures, *self.retry_at) if start_time(k[0]) != k[1]]
        for k in gone:
            self.forget_key(k)
            if self.untraceable.pop(k, None) is not None:
                self.untraceable_counts = dict(Counter(self.untraceable.values()))
