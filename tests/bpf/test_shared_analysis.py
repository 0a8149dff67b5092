"""An executable is analysed once, however many processes run it (DESIGN: "analysed
once per inode"): two processes of one binary and one of another cost two analyses,
the processes of one binary read the very same analysis, and the entry is gone (its
file closed) once the last process using it is closed."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest

import gobuild
from goleash.gobin.shared import AnalysisCache
from goleash.probes.target import GoProcess
from populations import running_populations

pytestmark = pytest.mark.root


def _open(path: str) -> bool:
    """This process still has `path` open."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            fds.add(os.readlink(f"/proc/self/fd/{fd}"))
    return path in fds


def _mapped(path: str) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(path) for line in maps)


def test_processes_of_one_binary_share_one_analysis_released_by_the_last() -> None:
    old, new = gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]
    cache = AnalysisCache()
    with (
        running_populations(new, "pie", worker=1) as a1,
        running_populations(new, "pie", worker=1) as a2,
        running_populations(old, "stripped", worker=1) as b,
    ):
        p1 = GoProcess.attach(a1.pid, cache=cache)
        p2 = GoProcess.attach(a2.pid, cache=cache)
        q = GoProcess.attach(b.pid, cache=cache)
        try:
            assert cache.analyses == 2
            assert len(cache) == 2
            assert p1.binary is p2.binary and p1.pclntab is p2.pclntab
            assert p1.offsets is p2.offsets and p1.symbols is p2.symbols
            assert q.binary is not p1.binary
            # Per-process facts stay per process: each PIE process has its own bias.
            assert p1.pid != p2.pid and p1.memory is not p2.memory
            assert p1.load_bias and p2.load_bias
            assert p2.runtime_addr(p2.pclntab.text_start) in range(
                p2.load_bias, p2.load_bias + (1 << 40)
            )
            shared_key = p1.binary.key
            target = os.readlink(f"/proc/{a1.pid}/exe")
            assert _open(target) and _mapped(target)

            p1.close()
            p1.close()  # twice: still one release
            assert shared_key in cache, "released while PID 2 still uses it"
            assert p2.binary.read(p2.pclntab.text_start, 16)  # still readable
            assert p2.same_executable()

            p2.close()
            assert shared_key not in cache
            assert len(cache) == 1
            assert p2.binary.fd == -1, "the last user's close closes the file"

            # A process of a binary whose entry was released is analysed afresh.
            p3 = GoProcess.attach(a2.pid, cache=cache)
            assert cache.analyses == 3
            p3.close()
        finally:
            for p in (p1, p2, q):
                p.close()
    assert len(cache) == 0
    # Once nothing of those processes is held, the file's mapping (their pclntab
    # reads it) and its descriptor are gone: nothing accumulates over months of churn.
    del p1, p2, p3, q
    gc.collect()
    assert not _mapped(target) and not _open(target)
