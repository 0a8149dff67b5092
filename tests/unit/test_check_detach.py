"""`goleash check` removes the probes of finished processes in batches: none while a
run is small (all go at the end, in the release helper, in no one's wall time), and
never more than a batch left behind in a long run (each holds links and fds)."""

from __future__ import annotations

import threading

from goleash.node import checktrace
from goleash.node.checkjudge import Judged
from goleash.node.checkreport import FollowedProcess, IgnoreList
from goleash.node.checktrace import Checker, _Tracked


class _Probes:
    """Records what the Checker asks the probes to remove."""

    def __init__(self) -> None:
        self.detached: list[int] = []
        self.done = threading.Event()

    def detach(self, pid: int) -> None:
        self.detached.append(pid)

    def forget(self, pid: int) -> None:
        if len(self.detached) >= checktrace.DETACH_BATCH:
            self.done.set()


def _checker(probes: _Probes, n: int) -> Checker:
    c = Checker(probes, ["go", "test"], IgnoreList(), set())  # type: ignore[arg-type]
    for pid in range(1000, 1000 + n):
        c.tracked[pid] = _Tracked(Judged(""), FollowedProcess(pid, "x.test", "go1.22", True), 1)
    return c


def test_a_small_run_removes_no_probe_before_the_end() -> None:
    probes = _Probes()
    c = _checker(probes, checktrace.DETACH_BATCH - 1)
    for pid in list(c.tracked):
        c.on_gone(pid)
    c.close()
    assert probes.detached == []


def test_a_long_run_removes_them_a_batch_at_a_time() -> None:
    probes = _Probes()
    n = checktrace.DETACH_BATCH
    c = _checker(probes, n + 3)
    for pid in list(c.tracked):
        c.on_gone(pid)
    assert probes.done.wait(10)
    c.close()
    assert probes.detached == list(range(1000, 1000 + n))
