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
from goleash.probes.inventory import read_goroutines
from goleash.probes.stacks import walk_stacks
from goleash.probes.target import GoProcess
from populations import running_populations

pytestmark = pytest.mark.root


def _opened(path: str) -> int:
    """How many descriptors of this process have `path` open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            n += os.readlink(f"/proc/self/fd/{fd}") == path
    return n


def _mapped(path: str) -> int:
    """How many of this process's mappings are of `path`."""
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(path) for line in maps)


def test_processes_of_one_binary_share_one_analysis_released_by_the_last() -> None:
    old, new = gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]
    cache = AnalysisCache()
    with (
        running_populations(new, "pie", worker=1) as a1,
        running_populations(new, "pie", worker=1) as a2,
        running_populations(old, "stripped", worker=1) as b,
    ):
        # Other tests in this process may hold the same fixture file: count, not test,
        # once their garbage is gone (the count at the end is taken after a collect).
        target = os.readlink(f"/proc/{a1.pid}/exe")
        gc.collect()
        before = (_mapped(target), _opened(target))
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
            assert _opened(target) > before[1] and _mapped(target) > before[0]
            # Walking stacks caches a symbolizer per binary: it must not keep it alive.
            stacks = walk_stacks(p1, read_goroutines(p1).goroutines)
            assert any(st.frames for st in stacks.values())

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
    assert (_mapped(target), _opened(target)) == before
