"""How many goroutines a Go process has created, read from its runtime: zero traps.

`runtime.sched.goidgen` (runtime2.go) is the goid generator. Each P takes goids
from it in batches of `_GoidCacheBatch` = 16 (proc.go, newproc1: `pp.goidcache =
sched.goidgen.Add(_GoidCacheBatch)`), and extra Ms for cgo callbacks take one each.
So goidgen grows by one per goroutine created, except that up to 16 goids per P
are handed out ahead: the difference of two reads counts the goroutines created in
between within 16 x GOMAXPROCS. That is what the tracker reports when the budget
took the probes off.

Where goidgen sits is checked per release, never guessed: `goidgen` is the first
field of `runtime.schedt` in go1.19 through go1.27 (each toolchain's
src/runtime/runtime2.go; the tests compare this with DWARF for every toolchain
they build with). A release outside that range, or a binary without the
`runtime.sched` symbol (stripped), has no counter to read: GoidgenUnavailable.
"""

from __future__ import annotations

from dataclasses import dataclass

from goleash.errors import GoleashError
from goleash.gobin.offsets import go_release
from goleash.probes.procmem import MemoryFault
from goleash.probes.target import GoProcess

GOID_CACHE_BATCH = 16  # proc.go _GoidCacheBatch, the same in go1.19 ... go1.27
# Offset of goidgen in runtime.schedt, per release (runtime2.go: the first field).
SCHEDT_GOIDGEN_OFFSET = {f"go1.{minor}": 0 for minor in range(19, 28)}
MAX_GOIDGEN = 1 << 62  # goids are int64: a larger value is not a goid counter


class GoidgenUnavailable(GoleashError):
    """This process's goroutine counter cannot be located or read."""


@dataclass(frozen=True)
class GoidCounter:
    """Where one process keeps sched.goidgen (and GOMAXPROCS, for the error bound)."""

    proc: GoProcess
    goidgen_addr: int
    gomaxprocs_addr: int | None

    def read(self) -> int:
        """goidgen now: goids handed out so far (to goroutines or P caches)."""
        try:
            value = self.proc.memory.read_u64(self.goidgen_addr)
        except MemoryFault as exc:
            raise GoidgenUnavailable(f"PID {self.proc.pid}: reading sched.goidgen: {exc}") from exc
        if not 0 < value < MAX_GOIDGEN:
            raise GoidgenUnavailable(
                f"PID {self.proc.pid}: sched.goidgen reads {value}: not a goid counter"
            )
        return value

    def error_bound(self) -> int | None:
        """How far a difference of two reads can be from the goroutines created
        (goids cached by every P), or None when GOMAXPROCS cannot be read."""
        if self.gomaxprocs_addr is None:
            return None
        try:
            raw = self.proc.memory.read(self.gomaxprocs_addr, 4)
        except MemoryFault:
            return None
        procs = int.from_bytes(raw, "little", signed=True)
        if not 0 < procs <= 1 << 20:
            return None
        return GOID_CACHE_BATCH * procs


def goid_counter(proc: GoProcess) -> GoidCounter:
    """The process's goidgen, checked once: it must read as at least every live goid
    the caller saw (see check)."""
    release = go_release(proc.build_info.go_version)
    offset = SCHEDT_GOIDGEN_OFFSET.get(release or "")
    if offset is None:
        raise GoidgenUnavailable(
            f"PID {proc.pid}: {proc.build_info.go_version}: where runtime.schedt keeps "
            "goidgen is not known for this release"
        )
    sched = proc.symbols.lookup("runtime.sched")
    if sched is None:
        raise GoidgenUnavailable(
            f"PID {proc.pid}: no runtime.sched symbol (stripped binary): "
            "goroutines created cannot be counted from memory"
        )
    gomaxprocs = proc.symbols.lookup("runtime.gomaxprocs")
    return GoidCounter(
        proc,
        proc.runtime_addr(sched[0] + offset),
        proc.runtime_addr(gomaxprocs[0]) if gomaxprocs else None,
    )


def checked_goid_counter(proc: GoProcess, max_live_goid: int) -> GoidCounter:
    """goid_counter, refused unless it reads at least MAX_LIVE_GOID (every goid came
    from it): a wrong address shows here, not as a wrong count later."""
    counter = goid_counter(proc)
    value = counter.read()
    if value < max_live_goid:
        raise GoidgenUnavailable(
            f"PID {proc.pid}: sched.goidgen reads {value}, below live goid {max_live_goid}: "
            "not this runtime's counter"
        )
    return counter
