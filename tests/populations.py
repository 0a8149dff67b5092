"""Run the `populations` Go fixture (tests/fixtures/go/populations) from a test.

    with running_populations("1.22.10", "pie", orphans=50, sleepers=5) as pop:
        pop.pid, pop.ready["populations"]["orphan"]["creator_goids"]
        pop.churn(1000)   # N short-lived goroutines, returns when all have exited

The fixture prints its "ready" line only once every population is parked where it
should be (it checks with runtime.Stack), so no test has to wait or guess.
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gobuild

if TYPE_CHECKING:
    from goleash.node.tracker import ProcessTracker
    from goleash.probes.goroutines import GoroutineProgram

READY_TIMEOUT = 60.0  # 100k goroutines on a busy 2-core CI machine take a few seconds
POPULATIONS = ("orphan", "nilselect", "condwait", "worker", "sleeper")
FLAGS = {
    "orphan": "orphans",
    "nilselect": "nilselect",
    "condwait": "condwait",
    "worker": "workers",
    "sleeper": "sleepers",
    "coroutine": "coroutines",
}


@dataclass
class Populations:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def count(self, population: str) -> int:
        return int(self.ready["populations"][population]["count"])

    @property
    def creator_goids(self) -> list[int]:
        return list(self.ready["populations"]["orphan"]["creator_goids"])

    def command(self, line: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return read_json_line(self.proc, timeout)

    def churn(self, n: int) -> None:
        assert self.command(f"churn {n}") == {"churned": n}


def read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"populations fixture (PID {proc.pid}) said nothing in {timeout}s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"populations fixture exited with {proc.wait()}")
            return dict(json.loads(line))


@contextmanager
def running_populations(
    toolchain: str, variant: str = "default", **counts: int
) -> Iterator[Populations]:
    """counts: orphan=, nilselect=, condwait=, worker=, sleeper= (default 0 each)."""
    binary = gobuild.build("populations", toolchain, variant)
    args = [str(binary)]
    for name, n in counts.items():
        args += [f"-{FLAGS[name]}", str(n)]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        ready = read_json_line(proc, READY_TIMEOUT)
        assert ready.get("ready") is True and ready["pid"] == proc.pid, ready
        yield Populations(proc, ready)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


@contextmanager
def tracked_pair(
    program: GoroutineProgram, toolchain: str, **counts: int
) -> Iterator[tuple[tuple[Populations, ProcessTracker], tuple[Populations, ProcessTracker]]]:
    """Two populations fixtures, each followed by a started tracker on one shared
    PROGRAM; the trackers are closed after the processes are gone (the program is
    the caller's)."""
    from goleash.node.tracker import ProcessTracker
    from goleash.probes.target import GoProcess

    trackers: list[ProcessTracker] = []
    with ExitStack() as stack:
        stack.callback(lambda: [tr.close() for tr in trackers])
        a = stack.enter_context(running_populations(toolchain, **counts))
        b = stack.enter_context(running_populations(toolchain, **counts))
        for pop in (a, b):
            tr = ProcessTracker(GoProcess.attach(pop.pid), program=program)
            trackers.append(tr)
            tr.start()
        yield (a, trackers[0]), (b, trackers[1])
