"""Giving back what exited processes leave behind, soon after they exit.

When the last process of an executable exits its analysis is dropped (gobin.shared),
but most of it does not go with the last reference: pyelftools' ELF and DWARF objects
refer to each other, so they, the debug sections they decompressed, and the file's
mapping and descriptor behind them wait for CPython's cyclic garbage collector. Its
full collections come only once the long-lived objects have grown by a quarter, which
an agent on a churning host rarely reaches: in the torture test (~1300 short-lived Go
processes in two minutes) the agent grew from ~80 to ~150 MiB, and one gc.collect()
gave most of it back. An agent that grows with the processes it has seen is
OOM-killed by its DaemonSet's limit on a busy node.

So the agent collects itself once analyses were made or dropped, then hands the freed
heap back to the system (malloc_trim): at most once per MIN_GAP_S, and spaced so that
collecting takes at most MAX_TIME_FRACTION of the time. A collection costs ~10-40 ms
here; a node with millions of live objects pays more per collection and so collects
less often.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable
from typing import Protocol

MIN_GAP_S = 2.0
MAX_TIME_FRACTION = 0.01


class DropCounter(Protocol):
    @property
    def dropped(self) -> int: ...


def trim_heap() -> None:
    """Hand the heap freed by a collection back to the system: glibc keeps it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Reclaimer:
    """Collects after `cache.dropped` changes, at most as often as the limits allow."""

    def __init__(
        self,
        cache: DropCounter,
        *,
        min_gap_s: float = MIN_GAP_S,
        max_time_fraction: float = MAX_TIME_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[], object] = gc.collect,
        trim: Callable[[], None] = trim_heap,
    ) -> None:
        self.cache = cache
        self.min_gap_s = min_gap_s
        self.max_time_fraction = max_time_fraction
        self.clock, self.collect, self.trim = clock, collect, trim
        self._collected_at_drop = cache.dropped  # nothing dropped yet: nothing to collect
        self._next_at = 0.0
        self.collections = 0
        self.seconds = 0.0  # spent collecting, in all

    @property
    def pending(self) -> bool:
        return self.cache.dropped != self._collected_at_drop

    def step(self) -> bool:
        """Collect if something was dropped since the last collection and it is time;
        True when it collected. Cheap otherwise: called at every scan."""
        if not self.pending:
            return False
        start = self.clock()
        if start < self._next_at:
            return False
        self._collected_at_drop = self.cache.dropped
        self.collect()
        self.trim()
        took = self.clock() - start
        self.collections += 1
        self.seconds += took
        self._next_at = start + max(self.min_gap_s, took / self.max_time_fraction)
        return True
