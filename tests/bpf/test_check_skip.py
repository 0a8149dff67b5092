"""check.bpf.c lets the execs of a path user space judged not to follow (the Go
toolchain, shells) go on without a stop or an event (its chk_skip map); every other
exec of a followed process still stops at its first instruction."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from goleash.probes.testleaks import FOLLOW_EXEC, PATH_LEN, CheckProbes

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def probes() -> Iterator[CheckProbes]:
    p = CheckProbes()
    try:
        yield p
    finally:
        p.close()


def _spawn(path: str) -> tuple[int, int]:
    """A child that execs PATH once told to (write to the fd returned)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os.execv(path, [path])
    os.close(r)
    return pid, w


def _exits_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
        time.sleep(0.01)
    return False


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _stops(pid: int, seconds: float = 5) -> bool:
    """PID is stopped (SIGSTOP from BPF lands on its way back to user space)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _state(pid) in ("T", "t"):
            return True
        time.sleep(0.005)
    return False


def _exec_events(probes: CheckProbes, pid: int, seconds: float) -> list:
    events: list = []
    deadline = time.monotonic() + seconds
    while not events and time.monotonic() < deadline:
        events = [e for e in probes.poll(20) if e.kind == FOLLOW_EXEC and e.pid == pid]
    return events


def test_an_exec_of_a_skipped_path_goes_on_unstopped(probes: CheckProbes) -> None:
    before = probes.counters()["skipped_execs"]
    probes.skip(b"/bin/true")
    pid, w = _spawn("/bin/true")
    try:
        probes.follow(pid)
        os.write(w, b"x")
        # Never stopped: it exits with nobody sending SIGCONT.
        assert _exits_within(pid, 5)
    finally:
        os.close(w)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert _exec_events(probes, pid, 0.1) == []  # and user space heard nothing
    assert probes.counters()["skipped_execs"] == before + 1


def _followed_exec(probes: CheckProbes, path: str) -> tuple[int, list]:
    pid, w = _spawn(path)
    try:
        probes.follow(pid)
        os.write(w, b"x")
        return pid, _exec_events(probes, pid, 5)
    finally:
        os.close(w)


def test_any_other_exec_still_stops_and_names_its_path(probes: CheckProbes) -> None:
    probes.skip(b"/bin/true")
    pid, events = _followed_exec(probes, "/bin/echo")
    try:
        assert [e.path for e in events] == [b"/bin/echo"]
        assert _stops(pid)  # waits for user space
        assert not _exits_within(pid, 0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
        assert _exits_within(pid, 5)


def _long_path(tmp: Path) -> str:
    """/bin/true behind a path longer than check.bpf.c reads."""
    d = tmp
    while len(str(d)) < PATH_LEN:
        d = d / ("d" * 60)
    d.mkdir(parents=True)
    (d / "true").symlink_to("/bin/true")
    return str(d / "true")


@pytest.mark.parametrize("kind", ["relative", "too-long"])
def test_paths_that_cannot_name_one_file_are_never_skipped(
    probes: CheckProbes, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path names another file from another directory, and a path cut
    short at PATH_LEN could be any of the paths sharing its start."""
    if kind == "relative":
        monkeypatch.chdir("/")
        path = "bin/true"
    else:
        path = _long_path(tmp_path)
    probes.skip(path.encode())
    pid, events = _followed_exec(probes, path)
    try:
        assert len(events) == 1
        assert events[0].path == (b"" if kind == "too-long" else path.encode())
        assert _stops(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
        assert _exits_within(pid, 5)
