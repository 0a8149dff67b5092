"""The goroutine probes of one process: its uprobes at the sites disassembly chose,
its row in the shared goroutines program (probes/goroutine_program.py), its part of
the kernel's tables as plain records.

Counts and lifetimes are aggregated in the kernel (site_stats); Python reads the
tables every interval, never a per-event stream.

By default only the creation site is probed (one hit per goroutine): the memory
inventory tells which goroutines live, so exits follow from births and live counts
(node/tracker.py); a birth takes the slot of a dead goroutine's record once its
tracker has read it (records_read), and reconcile() frees what the hash holds of
dead goroutines. `lifetimes=True` also probes runtime.goexit1 for exact per-site lifetime
distributions; the tracker's budget may take that probe off and on (detach_exits,
attach_exits), which makes lifetimes a sample.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from goleash.gobin.disasm import ProbeSite, goroutine_probe_sites
from goleash.probes.goroutine_program import (  # _names: views the layout test checks
    _LIVE_SLOT,  # noqa: F401
    _SLOT_WRITING,  # noqa: F401
    COUNTER_NAMES,
    LIFETIME_SLOTS,
    GoroutineProgram,
    LiveGoroutine,
    ProbeAttachError,
    SiteCounts,
    _GoroutineKey,  # noqa: F401
    _SiteKey,  # noqa: F401
    live_slots_for,
    load_count,
    process_layout,
)
from goleash.probes.target import GoProcess

__all__ = [
    "COUNTER_NAMES",
    "LIFETIME_SLOTS",
    "GoroutineProbes",
    "GoroutineProgram",
    "LiveGoroutine",
    "ProbeAttachError",
    "SiteCounts",
    "TrackerReading",
    "load_count",
    "live_slots_for",
    "node_program",
]

# One process on its own (`goleash trace`, tests): the whole program is its.
DEFAULT_MAX_LIVE = 131072
DEFAULT_MAX_SITES = 4096
# The agent's program, shared by every process of the node.
NODE_MAX_LIVE = 131072  # slots, and as many hash entries
NODE_MAX_SITES = 16384
NODE_MAX_LIVE_PER_PROCESS = 65536  # of the hash: the slots are first come
NODE_MAX_SITES_PER_PROCESS = 4096


def node_program(*, stacks: bool = False) -> GoroutineProgram:
    """The program an agent shares between all its processes (loaded on first use)."""
    return GoroutineProgram(
        stacks=stacks,
        max_live=NODE_MAX_LIVE,
        max_sites=NODE_MAX_SITES,
        max_live_per_process=NODE_MAX_LIVE_PER_PROCESS,
        max_sites_per_process=NODE_MAX_SITES_PER_PROCESS,
    )


@dataclass
class TrackerReading:
    sites: dict[tuple[int, int], SiteCounts]
    live: dict[int, LiveGoroutine]
    counters: dict[str, int]
    creator_stacks: dict[int, list[int]] = field(default_factory=dict)


class GoroutineProbes:
    """The goroutine probes of one process. `attach()`, `read()`, `detach()`, `close()`.

    With `program` (the agent's, see node_program) the process shares that compiled
    program and its tables with every other traced process; without, it gets a
    program of its own (stacks, max_live, max_sites apply to that one only), which
    is the same code path for a single process (`goleash trace`).

    Live goroutines are kept in a direct-mapped array (live_slots_for(max_live)
    slots) with a hash of max_live entries for those whose slot is taken; past
    those (or the process's share) `live_table_full` counts a drop.
    """

    def __init__(
        self,
        proc: GoProcess,
        *,
        stacks: bool = False,
        max_live: int = DEFAULT_MAX_LIVE,
        max_sites: int = DEFAULT_MAX_SITES,
        program: GoroutineProgram | None = None,
        lifetimes: bool = False,
    ) -> None:
        self.proc = proc
        self.lifetimes = lifetimes
        self._owns_program = program is None
        self.program = program or GoroutineProgram(
            stacks=stacks, max_live=max_live, max_sites=max_sites
        )
        self.stacks = self.program.stacks
        self.sites = goroutine_probe_sites(proc.binary, proc.symbols.lookup)
        self._attached: list[ProbeSite] = []
        self._detaches: list[Callable[[], None]] = []  # one per attached group of sites
        self._exit_detach: Callable[[], None] | None = None  # the exit probe's
        self._registered = False

    # --- lifecycle ----------------------------------------------------------------

    def _exe(self) -> str:
        return f"/proc/{self.proc.pid}/exe"

    @property
    def create_sites(self) -> list[ProbeSite]:
        if self.sites.create_kind == "runqput_call" and self.sites.create is not None:
            return [self.sites.create]
        return list(self.sites.create_rets)

    @property
    def create_function(self) -> str:
        # runqput(pp, newg, next): RBX is the second integer argument (ABIInternal);
        # newproc1 returns the new g in RAX.
        if self.sites.create_kind == "runqput_call" and self.sites.create is not None:
            return "on_create_bx"
        return "on_create_ax"

    @property
    def stepped_sites(self) -> int:
        """How many of the attached sites the kernel single-steps (cost model)."""
        n = sum(1 for s in self._attached if not s.emulated)
        return n + (1 if self._exit_detach is not None and not self.sites.exit.emulated else 0)

    def attach(self) -> None:
        if not self._registered:
            self.program.register(self.proc.pid, process_layout(self.proc.offsets))
            self._registered = True
        plan: list[tuple[list[ProbeSite], str]] = [(self.create_sites, self.create_function)]
        if self.stacks:
            plan.append(([self.sites.newproc_entry], "on_newproc"))
        try:
            for sites, fn in plan:
                offsets = [s.file_offset for s in sites]
                self._detaches.append(self.program.attach(self.proc.pid, self._exe(), offsets, fn))
                self._attached.extend(sites)
        except Exception as exc:
            self.detach()
            if not os.path.exists(f"/proc/{self.proc.pid}"):
                raise ProbeAttachError(f"PID {self.proc.pid} exited while attaching") from exc
            raise ProbeAttachError(f"attaching uprobes to PID {self.proc.pid}: {exc}") from exc
        if self.lifetimes:
            self.attach_exits()

    def attach_exits(self) -> None:
        """The exit probe (--lifetimes): attached first, then the program told, so no
        birth claims a slot that no exit would free."""
        if self._exit_detach is not None or not self._attached:
            return
        try:
            self._exit_detach = self.program.attach(
                self.proc.pid, self._exe(), [self.sites.exit.file_offset], "on_exit"
            )
        except Exception as exc:
            self.detach()
            raise ProbeAttachError(
                f"attaching the exit probe to PID {self.proc.pid}: {exc}"
            ) from exc
        self.program.set_exits(self.proc.pid, True)

    def detach_exits(self) -> None:
        """The exit probe only (births still counted): the program told first."""
        if self._exit_detach is None:
            return
        if self.program.bpf is not None:
            self.program.set_exits(self.proc.pid, False)
            with contextlib.suppress(Exception):  # already gone with its process
                self._exit_detach()
        self._exit_detach = None

    @property
    def exits_attached(self) -> bool:
        return self._exit_detach is not None

    def reconcile(self, live_goids: set[int] | frozenset[int], born_before_ns: int) -> int:
        """Free the birth records of goroutines no longer live (see
        GoroutineProgram.reconcile); returns how many."""
        if not self._registered or self.program.bpf is None:
            return 0
        return self.program.reconcile(self.proc.pid, live_goids, born_before_ns)

    def records_read(self, born_before_ns: int) -> None:
        """Every record of a goroutine born before BORN_BEFORE_NS and live then is
        read and kept: another process's births may take the slots of the rest."""
        if self._registered and self.program.bpf is not None:
            self.program.records_read(self.proc.pid, born_before_ns)

    @property
    def compiled(self) -> bool:
        """The process has counts to read (its maps stay readable until close())."""
        return self._registered and self.program.compiled

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def detach(self) -> None:
        """Remove this process's uprobes (its counts stay readable until close())."""
        self.detach_exits()
        if self.program.bpf is not None:
            for undo in self._detaches:
                with contextlib.suppress(Exception):  # already gone with its process
                    undo()
        self._detaches.clear()
        self._attached.clear()

    def close(self) -> None:
        """Its uprobes, then its records in the shared tables; the program itself
        only if it is this process's own."""
        self.detach()
        if self._registered:
            self._registered = False
            self.program.unregister(self.proc.pid)
        if self._owns_program:
            self.program.close()

    # --- reading --------------------------------------------------------------------

    def read(
        self, *, with_live: bool = True, goids: Collection[int] | None = None
    ) -> TrackerReading:
        """Counters, per-site counts and birth records: every record the kernel holds
        of the process, or with GOIDS only those goroutines' (what a tracker that
        knows the live set needs, at a cost that does not grow with the goroutines
        born and dead since the last reading)."""
        assert self.compiled
        bias = self.proc.load_bias
        pid = self.proc.pid
        part = self.program.reading(pid, with_live=with_live and goids is None)
        if not with_live:
            records: dict[int, LiveGoroutine] = {}
        elif goids is None:
            records = part.live
        else:
            records = self.program.births_of(pid, goids)
        sites, live = dict(part.sites), records
        if bias:
            sites = {
                (gopc - bias, startpc - bias): replace(c, gopc=gopc - bias, startpc=startpc - bias)
                for (gopc, startpc), c in part.sites.items()
            }
            live = {
                goid: replace(g, gopc=g.gopc - bias, startpc=g.startpc - bias)
                for goid, g in records.items()
            }
        stacks: dict[int, list[int]] = {}
        if self.stacks and with_live and self.program.bpf is not None:
            table = self.program.bpf["creator_stacks"]
            for sid in {g.stack_id for g in live.values() if g.stack_id >= 0}:
                with contextlib.suppress(KeyError):
                    pcs = table[table.Key(sid)]
                    stacks[sid] = [pc - bias for pc in itertools.takewhile(bool, pcs)]
        return TrackerReading(
            sites=sites, live=live, counters=dict(part.counters), creator_stacks=stacks
        )
