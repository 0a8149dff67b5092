"""The one compiled goroutines program of an agent, shared by every traced process.

bpf/goroutines.bpf.c is compiled once per GoroutineProgram (a BCC compile costs
~0.6 CPU-s and leaves ~30 MB behind; per process that crash-looped the DaemonSet).
What differs per process is a row of the gr_procs map, found by pid: the runtime.g
offsets of its Go release, as word indexes into the one read a hit makes. Every
other table is shared and keyed by pid, and each record that outlives a hit carries
the process's registration number (gen), so a pid reused by a new process never
inherits an old one's counts.

Reading walks each shared table once for all processes (`reading(pid)` hands each
process its part of one walk), never once per process.

The program is loaded from the node's image cache (probes/bpfimage.py, bpfload.py):
compiled by BCC in a child process the first time on a node (per kernel, BCC and
goleash version), loaded with bpf(2) after, so the agent itself never maps LLVM.
Its maps are read through the ctypes views of goroutine_maps.py, which test_layouts
holds to bpf/goleash.h as clang lays it out.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from goleash.errors import GoleashError
from goleash.probes.bpfload import LoadedBpf, Origin, open_program
from goleash.probes.bpfsrc import bpf_dir
from goleash.probes.goroutine_maps import (  # noqa: F401  (re-exported)
    _LIVE_SLOT,
    _MAPS,
    _SITE_WORDS,
    _SLOT_WRITING,
    _STACK_MAP,
    COUNTER_NAMES,
    LIFETIME_SLOTS,
    _GoroutineKey,
    _SiteKey,
)
from goleash.probes.goroutine_records import (  # noqa: F401  (re-exported)
    NO_FIELD,
    SLOT_HEAD,
    SPAN_WORDS,
    LiveGoroutine,
    ProbeAttachError,
    ProcessLayout,
    ProcessTables,
    SiteCounts,
    free_slots,
    live_slots_for,
    occupied_slots,
    process_layout,
    records_in_slots,
    stale_slots,
)
from goleash.probes.uprobe import ProgramLinks

PID_SLOTS = 4096  # GR_PID_SLOTS: pids found without a hash lookup (the rest: one)
DEFAULT_MAX_PROCS = 1024
GR_WITH_EXITS = 1  # gr_modes: the exit probe is attached (bpf/goleash.h)
SITE_READ_TRIES = 3  # site_stats re-reads while births move out of site_cache
# A walk of the tables serves every process once; a process asking again (or after
# this long) gets a new walk.
TABLES_MAX_AGE_S = 1.0
# Below this many entries, walking live_goroutines key by key beats a batch lookup,
# which allocates arrays for the table's whole capacity.
BATCH_FROM = 2048


_loads = 0


def load_count() -> int:
    """How many times this Python process loaded goroutines.bpf.c (compiled, or from
    the image cache): once per agent, whatever the number of processes."""
    return _loads


@dataclass
class _Walk:
    taken: float
    with_live: bool
    procs: dict[int, ProcessTables]
    gens: dict[int, int] = field(default_factory=dict)
    served: set[int] = field(default_factory=set)


def _site_counts(gopc: int, startpc: int, per_cpu: ctypes.Array) -> SiteCounts:  # type: ignore[type-arg]
    words = memoryview(per_cpu).cast("B").cast("Q").tolist()
    cols = [sum(words[i::_SITE_WORDS]) for i in range(_SITE_WORDS)]
    return SiteCounts(gopc, startpc, cols[0], cols[1], cols[2], cols[3], tuple(cols[4:]))


class GoroutineProgram:
    """goroutines.bpf.c loaded once, for every process registered with it.

    Capacity is the node's: max_live slots (a power of two) plus a max_live-entry
    hash, max_sites creation sites. A process may hold at most its share of the hash
    and of the sites; beyond it (or when the table is full) it counts drops in its
    own counters, so one busy process cannot starve the others unnoticed.
    """

    def __init__(
        self,
        *,
        stacks: bool = False,
        max_live: int,
        max_sites: int,
        max_live_per_process: int | None = None,
        max_sites_per_process: int | None = None,
        max_procs: int = DEFAULT_MAX_PROCS,
        pid_slots: int = PID_SLOTS,
    ) -> None:
        self.stacks = stacks
        self.max_live = max_live
        self.max_sites = max_sites
        self.max_live_per_process = max_live_per_process or max_live
        self.max_sites_per_process = max_sites_per_process or max_sites
        self.max_procs = max_procs
        self.pid_slots = live_slots_for(pid_slots)  # a power of two
        self.bpf: LoadedBpf | None = None
        self.origin: Origin | None = None  # from the cache, or compiled and why
        self._registered: dict[int, int] = {}  # pid -> gen
        self._rows: dict[int, int] = {}  # pid -> its row of gr_procs
        self._gens = itertools.count(1)
        self._slots_mm: mmap.mmap | None = None
        self._walk: _Walk | None = None
        self._lock = threading.Lock()
        self._compile_error: ProbeAttachError | None = None
        self._links: ProgramLinks | None = None

    # --- lifecycle ----------------------------------------------------------------

    def cflags(self) -> list[str]:
        flags = [
            f"-I{bpf_dir()}",
            f"-DMAX_PROCS={self.max_procs}",
            f"-DMAX_LIVE={self.max_live}",
            f"-DLIVE_SLOTS={live_slots_for(self.max_live)}",
            f"-DMAX_SITES={self.max_sites}",
            f"-DGR_PID_SLOTS={self.pid_slots}",
        ]
        if self.stacks:
            flags.append("-DWITH_STACKS=1")
        return flags

    def programs(self) -> list[str]:
        """The functions of goroutines.bpf.c that processes' uprobes run."""
        return ["on_create_bx", "on_create_ax", "on_exit"] + (["on_newproc"] if self.stacks else [])

    def compile(self) -> None:
        """Load the program: from the image cache, else compiled (in a child process)
        and cached. A failure is kept and raised again: not a compile per process."""
        global _loads
        if self.bpf is not None:
            return
        if self._compile_error is not None:
            raise self._compile_error
        try:
            bpf, origin = open_program(
                "goroutines", bpf_dir() / "goroutines.bpf.c", self.cflags(), self.programs()
            )
        except (GoleashError, OSError) as exc:
            self._compile_error = ProbeAttachError(f"compiling goroutines.bpf.c failed: {exc}")
            raise self._compile_error from exc
        try:
            for name, (key, value) in _MAPS.items():
                bpf.map(name, key, value)
            if self.stacks:
                bpf.map(*_STACK_MAP)
        except (GoleashError, KeyError) as exc:
            bpf.cleanup()
            self._compile_error = ProbeAttachError(
                f"goroutines.bpf.c and goroutine_program.py disagree: {exc}"
            )
            raise self._compile_error from exc
        self.bpf = bpf
        self.origin = origin
        _loads += 1

    @property
    def compiled(self) -> bool:
        return self.bpf is not None

    @property
    def pids(self) -> frozenset[int]:
        return frozenset(self._registered)

    def close(self) -> None:
        """Unload the program (every process's uprobes go with it)."""
        with self._lock:
            self._registered.clear()
            self._rows.clear()
            self._walk = None
            if self._slots_mm is not None:
                self._slots_mm.close()
                self._slots_mm = None
            if self._links is not None:
                self._links.close()
                self._links = None
            if self.bpf is not None:
                self.bpf.cleanup()
                self.bpf = None

    # --- attaching -----------------------------------------------------------------

    def attach(
        self, pid: int, exe: str, file_offsets: Sequence[int], fn: str
    ) -> Callable[[], None]:
        """FN at every offset of EXE for PID (see ProgramLinks); returns the detach."""
        assert self.bpf is not None
        if self._links is None:
            self._links = ProgramLinks(self.bpf)
        return self._links.attach(pid, exe, file_offsets, fn)

    def program_fds(self) -> dict[str, list[int]]:
        """Each function's loaded programs (for perf events, for links): their fds."""
        out: dict[str, list[int]] = {}
        if self.bpf is not None:
            for raw_name, f in self.bpf.funcs.items():
                out.setdefault(raw_name.decode(), []).append(f.fd)
        if self._links is not None:
            for name, fd in self._links.fds().items():
                out.setdefault(name, []).append(fd)
        return out

    # --- processes ------------------------------------------------------------------

    def register(self, pid: int, layout: ProcessLayout, *, with_exits: bool = False) -> None:
        """Make PID's hits count (before its uprobes are attached). WITH_EXITS: its
        exit probe will be attached (see set_exits)."""
        self.compile()
        assert self.bpf is not None
        with self._lock:
            if pid in self._registered:
                raise ProbeAttachError(f"PID {pid} is already traced by this agent")
            free = sorted(set(range(self.max_procs)) - set(self._rows.values()))
            if not free:
                raise ProbeAttachError(
                    f"already tracing {self.max_procs} processes, the most one program holds"
                )
            row_idx = free[0]
            gen = next(self._gens) & 0xFFFFFFFF or next(self._gens)
            usage = self.bpf["gr_usage"]
            u = usage.Leaf()
            u.max_live_in_hash = self.max_live_per_process
            u.max_sites = self.max_sites_per_process
            usage[usage.Key(pid)] = u
            procs = self.bpf["gr_procs"]
            row = procs.Leaf()
            for cpu in range(len(row)):
                p = row[cpu]
                p.gen = gen
                p.span_start = layout.span_start
                p.span_bytes = layout.span_bytes
                p.w_goid = layout.w_goid
                p.w_gopc = layout.w_gopc
                p.w_startpc = layout.w_startpc
                p.w_parent = layout.w_parent
                p.g_goid = layout.g_goid
                p.g_m = layout.g_m
                p.m_curg = layout.m_curg
            procs[procs.Key(row_idx)] = row
            modes = self.bpf["gr_modes"]
            modes[modes.Key(row_idx)] = modes.Leaf(GR_WITH_EXITS if with_exits else 0)
            self.bpf["gr_freed"].clearitem(self.bpf["gr_freed"].Key(row_idx))
            self.bpf["gr_read_ns"].clearitem(self.bpf["gr_read_ns"].Key(row_idx))
            # Then where the program finds the row: the pid's slot if free, else the hash.
            slots = self.bpf["gr_pid_slots"]
            slot_key = slots.Key(pid % self.pid_slots)
            if slots[slot_key].pid == 0:
                slot = slots.Leaf()
                slot.pid, slot.row = pid, row_idx
                slots[slot_key] = slot
            else:
                rows = self.bpf["gr_pid_rows"]
                rows[rows.Key(pid)] = rows.Leaf(row_idx)
            self._rows[pid] = row_idx
            self._registered[pid] = gen

    def unregister(self, pid: int) -> None:
        """Forget PID: its row first (hits find nothing to count into), then its
        records in the shared tables. Its uprobes must be detached already."""
        with self._lock:
            gen = self._registered.pop(pid, None)
            if gen is None or self.bpf is None:
                return
            self._walk = None
            b = self.bpf
            row_idx = self._rows.pop(pid)
            slots = b["gr_pid_slots"]
            slot_key = slots.Key(pid % self.pid_slots)
            if slots[slot_key].pid == pid:
                slots.clearitem(slot_key)
            for name in ("gr_pid_rows", "gr_usage"):
                t = b[name]
                with contextlib.suppress(KeyError):
                    del t[t.Key(pid)]
            b["gr_procs"].clearitem(b["gr_procs"].Key(row_idx))  # its counters: zero
            b["gr_modes"].clearitem(b["gr_modes"].Key(row_idx))
            b["gr_freed"].clearitem(b["gr_freed"].Key(row_idx))
            if self.stacks:
                self._forget_stacks(pid, gen, self._slots())
            for name in ("live_goroutines", "site_stats"):
                t = b[name]
                for k in [k for k in t if k.pid == pid]:
                    with contextlib.suppress(KeyError):
                        del t[k]
            # Its slots (a birth of another process may take one meanwhile: free_slots
            # leaves that alone).
            mm, n = self._writable_slots(), live_slots_for(self.max_live)
            free_slots(mm, stale_slots(mm, n, pid, gen, frozenset(), 1 << 64), pid, gen)
            # Its site_cache entries are dropped by the program when evicted (their
            # gen is no longer registered) and skipped by readers meanwhile.

    def set_exits(self, pid: int, on: bool) -> None:
        """Tell the program whether PID's exit probe is attached: with it births
        claim slots (CAS) and exits free them; without, births take slots of their
        own process and read records of others (records_read). Attach the exit probe
        before switching on, switch off before detaching it."""
        assert self.bpf is not None
        with self._lock:
            row_idx = self._rows.get(pid)
            if row_idx is None:
                return
            modes = self.bpf["gr_modes"]
            modes[modes.Key(row_idx)] = modes.Leaf(GR_WITH_EXITS if on else 0)

    def records_read(self, pid: int, born_before_ns: int) -> None:
        """PID's tracker has read every record of a goroutine born before
        BORN_BEFORE_NS that was live then, and keeps those: births of other
        processes may take the slots of the rest (may_take in goroutines.bpf.c)."""
        with self._lock:
            row_idx = self._rows.get(pid)
            if row_idx is not None and self.bpf is not None:
                table = self.bpf["gr_read_ns"]
                table[table.Key(row_idx)] = table.Leaf(born_before_ns)

    def _exits_on(self, pid: int) -> bool:
        assert self.bpf is not None
        row_idx = self._rows.get(pid)
        if row_idx is None:
            return False
        modes = self.bpf["gr_modes"]
        return bool(modes[modes.Key(row_idx)].value & GR_WITH_EXITS)

    def reconcile(
        self, pid: int, live_goids: set[int] | frozenset[int], born_before_ns: int
    ) -> int:
        """Free PID's records of goroutines the memory inventory no longer sees live.

        Only records of births before BORN_BEFORE_NS (when the inventory read started)
        are judged: a goroutine born later may be live but missing from that read.
        Hash entries are deleted. Slots are freed only while PID's exit probe is on
        (then births claim free slots only, and exits free them first: goexit1 runs
        before the g is dead in memory; what is left are records whose exit was
        missed), found by one pass over the array's owner and goid words and freed
        through the writable mmap (a store of goid 0, no syscall per slot). Returns
        how many records were freed."""
        with self._lock:
            gen = self._registered.get(pid)
            if gen is None or self.bpf is None:
                return 0
            if self._walk is not None:
                # What it holds of PID may be freed now: PID's next reading walks again
                # (the other processes' parts stay true: only PID's records go).
                self._walk.served.add(pid)
            freed = 0
            if self._exits_on(pid):
                # Then births claim only free slots: free those whose exit was missed.
                # Without it, births take read records' slots (may_take, goroutines.bpf.c).
                mm = self._writable_slots()
                slots = live_slots_for(self.max_live)
                stale = stale_slots(mm, slots, pid, gen, live_goids, born_before_ns)
                freed = free_slots(mm, stale, pid, gen)
            # Entries of the hash: a delete that succeeds is counted in gr_freed, the
            # program's own deletes (exits) in live_in_hash: neither counts twice.
            in_hash = self.hash_entries(pid)
            if in_hash <= 0:  # the usual case: no walk of the shared hash
                return freed
            freed_table = self.bpf["gr_freed"]
            freed_key = freed_table.Key(self._rows[pid])
            table = self.bpf["live_goroutines"]
            dead = [
                k.goid
                for k, v in self._hash_items(in_hash)
                if k.pid == pid and k.goid not in live_goids and v.created_ns < born_before_ns
            ]
            deleted = 0
            for goid in dead:
                with contextlib.suppress(KeyError):
                    del table[table.Key(pid, 0, goid)]
                    deleted += 1
            if deleted:
                total = freed_table[freed_key].value + deleted
                freed_table[freed_key] = freed_table.Leaf(total)
            return freed + deleted

    def _forget_stacks(self, pid: int, gen: int, live_slots: list) -> None:  # type: ignore[type-arg]
        """The creator stacks only PID's live goroutines refer to. The stack map is
        shared: processes of one non-PIE executable share stack ids, so an id
        another live goroutine uses stays. (Ids of goroutines that already exited
        stay too, as they did with a program per process.)"""
        assert self.bpf is not None
        mine: set[int] = set()
        others: set[int] = set()
        for *_, slot_pid, slot_gen, _p, _gopc, _startpc, _ns, sid in live_slots:
            if sid >= 0:
                (mine if (slot_pid, slot_gen) == (pid, gen) else others).add(sid)
        for k, v in self.bpf["live_goroutines"].items():
            if v.stack_id >= 0:
                (mine if k.pid == pid else others).add(v.stack_id)
        table = self.bpf["creator_stacks"]
        for sid in mine - others:
            with contextlib.suppress(KeyError):
                del table[table.Key(sid)]

    # --- reading --------------------------------------------------------------------

    def reading(self, pid: int, *, with_live: bool = True) -> ProcessTables:
        """PID's part of the shared tables: from the last walk if PID has not had
        it yet, it is recent and PID's hit counters are what that walk read (no hit
        since: its part is still current, so it is as fresh as a walk now, after
        the caller's read of PID's memory), else from a new walk."""
        with self._lock:
            w = self._walk
            if (
                w is None
                or pid in w.served
                or (with_live and not w.with_live)
                or time.monotonic() - w.taken > TABLES_MAX_AGE_S
                or w.gens.get(pid) != self._registered.get(pid)
                or (pid in self._rows and self._counters(pid) != w.procs[pid].counters)
            ):
                w = self._walk = self._walk_tables(with_live)
            w.served.add(pid)
            return w.procs.get(pid) or ProcessTables(
                counters=dict.fromkeys(COUNTER_NAMES, 0), sites={}, live={}
            )

    def _walk_tables(self, with_live: bool) -> _Walk:
        assert self.bpf is not None
        regs = dict(self._registered)
        procs = {
            pid: ProcessTables(counters=self._counters(pid), sites={}, live={}) for pid in regs
        }
        for (pid, gopc, startpc), counts in self._read_sites(regs).items():
            procs[pid].sites[(gopc, startpc)] = counts
        if with_live:
            for pid, g in self._read_live(regs):
                procs[pid].live[g.goid] = g
        return _Walk(time.monotonic(), with_live, procs, regs)

    def _counters(self, pid: int) -> dict[str, int]:
        assert self.bpf is not None
        t = self.bpf["gr_procs"]
        row = t[t.Key(self._rows[pid])]
        return {name: sum(int(p.counters[i]) for p in row) for i, name in enumerate(COUNTER_NAMES)}

    def _site_table(self, regs: dict[int, int]) -> dict[tuple[int, int, int], ctypes.Array]:  # type: ignore[type-arg]
        assert self.bpf is not None
        return {
            (k.pid, k.gopc, k.startpc): v
            for k, v in self.bpf["site_stats"].items()
            if regs.get(k.pid) == k.gen
        }

    @staticmethod
    def _created(table: dict[tuple[int, int, int], ctypes.Array]) -> dict[tuple, int]:  # type: ignore[type-arg]
        return {k: sum(p.created for p in v) for k, v in table.items()}

    def _read_sites(self, regs: dict[int, int]) -> dict[tuple[int, int, int], SiteCounts]:
        """site_stats plus the births still pending in each CPU's site_cache. A birth
        moves from the cache to site_stats when its entry is taken (cache first, then
        the table): reading the table before and after the cache, and again if it
        changed meanwhile, counts each birth once."""
        assert self.bpf is not None
        before = self._site_table(regs)
        pending: dict[tuple[int, int, int], int] = {}
        for _ in range(SITE_READ_TRIES):
            pending = {}
            for _idx, per_cpu in self.bpf["site_cache"].items():
                for e in per_cpu:
                    if e.created and regs.get(e.pid) == e.gen:
                        key = (e.pid, e.gopc, e.startpc)
                        pending[key] = pending.get(key, 0) + int(e.created)
            after = self._site_table(regs)
            stable = self._created(after) == self._created(before)
            before = after
            if stable:
                break
        # Still moving after the tries: a birth may be missed for this one reading
        # (never counted twice); the next reading finds it in site_stats.
        sites = {k: _site_counts(k[1], k[2], v) for k, v in before.items()}
        for key, n in pending.items():
            old = sites.get(key)
            sites[key] = (
                SiteCounts(key[1], key[2], n, 0, 0, 0, (0,) * LIFETIME_SLOTS)
                if old is None
                else replace(old, created=old.created + n)
            )
        return sites

    def _writable_slots(self) -> mmap.mmap:
        """live_slots mapped into this process: read by readers, written (goid 0) only
        by reconcile() and unregister()."""
        assert self.bpf is not None
        if self._slots_mm is None:
            size = live_slots_for(self.max_live) * _LIVE_SLOT.size
            size += -size % mmap.PAGESIZE
            fd = self.bpf["live_slots"].map_fd
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            self._slots_mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        return self._slots_mm

    def _slots(self, pid: int | None = None) -> list[tuple[int, ...]]:
        """The occupied slots of live_slots as (index, goid, pid, gen, info...), read
        through an mmap of the array (no syscall per slot); only PID's when given."""
        assert self.bpf is not None
        found = occupied_slots(self._writable_slots(), _LIVE_SLOT, live_slots_for(self.max_live))
        return [s for s in found if s[1] != _SLOT_WRITING and (pid is None or s[2] == pid)]

    def _read_live(self, regs: dict[int, int]) -> list[tuple[int, LiveGoroutine]]:
        """(pid, goroutine) of every record of every registered pid."""
        assert self.bpf is not None
        out = [
            (pid, LiveGoroutine(goid, parent, gopc, startpc, created_ns, stack_id))
            for _i, goid, pid, gen, parent, gopc, startpc, created_ns, stack_id in self._slots()
            if regs.get(pid) == gen
        ]
        usage = self.bpf["gr_usage"]
        in_hash = sum(u.live_in_hash for _k, u in usage.items())
        for k, v in self._hash_items(in_hash):
            if k.pid in regs:
                out.append((k.pid, _from_hash(k, v)))
        return out

    def _hash_items(self, in_hash: int) -> list:  # type: ignore[type-arg]
        """Every entry of live_goroutines (about IN_HASH of them)."""
        assert self.bpf is not None
        table = self.bpf["live_goroutines"]
        if in_hash >= BATCH_FROM:
            with contextlib.suppress(Exception):
                return list(table.items_lookup_batch())  # ~8x faster than items() at 100k
        return list(table.items())

    def births_of(self, pid: int, goids: Collection[int]) -> dict[int, LiveGoroutine]:
        """PID's birth records of the goroutines GOIDS (those the program holds): each
        read from the one slot the program would put it in, else from the hash. Costs
        one small read per goid, however many dead goroutines' records the tables hold
        (a busy service leaves ~100k an interval), where a walk reads them all."""
        with self._lock:
            gen = self._registered.get(pid)
            if gen is None or self.bpf is None or not goids:
                return {}
            slots = live_slots_for(self.max_live)
            found, missing = records_in_slots(self._writable_slots(), slots, pid, gen, goids)
            out = {goid: LiveGoroutine(goid, *info) for goid, info in found.items()}
            if missing and self.hash_entries(pid) > 0:
                # A birth whose slot was taken went to the hash: look there for the
                # rest, by key when they are few, else in one walk of the hash.
                table = self.bpf["live_goroutines"]
                if len(missing) <= BATCH_FROM:
                    for goid in missing:
                        with contextlib.suppress(KeyError):
                            key = table.Key(pid, 0, goid)
                            out[goid] = _from_hash(key, table[key])
                else:
                    want = set(missing)
                    for k, v in self._hash_items(self.max_live):
                        if k.pid == pid and k.goid in want:
                            out[k.goid] = _from_hash(k, v)
            return out

    def hash_entries(self, pid: int) -> int:
        """How many of live_goroutines' entries are PID's (what it put in, less what
        reconcile freed)."""
        assert self.bpf is not None
        freed_table = self.bpf["gr_freed"]
        usage = self.bpf["gr_usage"]
        try:
            in_hash = usage[usage.Key(pid)].live_in_hash
            return int(in_hash - freed_table[freed_table.Key(self._rows[pid])].value)
        except KeyError:
            return 0


def _from_hash(k: _GoroutineKey, v: ctypes.Structure) -> LiveGoroutine:
    return LiveGoroutine(k.goid, v.parent_goid, v.gopc, v.startpc, v.created_ns, v.stack_id)  # type: ignore[attr-defined]
