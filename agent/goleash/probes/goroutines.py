"""BCC side of goroutine tracking: compile bpf/goroutines.bpf.c for one process,
attach at the sites disassembly chose, read its maps into plain records.

Counts and lifetimes are aggregated in the kernel (site_stats); Python reads the
tables every interval, never a per-event stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import mmap
import os
import struct
from dataclasses import dataclass, field

from goleash.errors import GoleashError
from goleash.gobin.disasm import GoroutineProbeSites, ProbeSite, goroutine_probe_sites
from goleash.probes.bpfsrc import bpf_dir
from goleash.probes.target import GoProcess
from goleash.probes.uprobe import attach_at, detach

BPF_DIR = bpf_dir()
LIFETIME_SLOTS = 48
COUNTER_NAMES = (
    "create_hits",
    "exit_hits",
    "newproc_hits",
    "live_table_full",
    "site_table_full",
    "read_faults",
    "stack_faults",
)
DEFAULT_MAX_LIVE = 131072
DEFAULT_MAX_SITES = 4096
SITE_READ_TRIES = 3  # site_stats re-reads while births move out of site_cache
MAX_SPAN = 256  # bytes of runtime.g read per hit (168 on go1.19, the widest so far)


# struct live_slot in bpf/goleash.h: goid, pid, _pad, then struct goroutine_info.
_LIVE_SLOT = struct.Struct("<QIIQQQQq")
_SLOT_WRITING = (1 << 64) - 1  # empty slots have goid 0


def live_slots_for(max_live: int) -> int:
    """Slots of the direct-mapped live array: the largest power of two <= max_live
    (a mask, not a division, picks the slot)."""
    return 1 << (max(max_live, 1).bit_length() - 1)


class ProbeAttachError(GoleashError):
    """BCC could not compile or attach the goroutine probes."""


# ctypes views of bpf/goleash.h (same field order).
class _GoroutineKey(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("goid", ctypes.c_uint64)]


class _SiteKey(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("gopc", ctypes.c_uint64),
        ("startpc", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class SiteCounts:
    """Kernel-side counts of one creation site since attach (link-time PCs)."""

    gopc: int
    startpc: int
    created: int
    exited: int
    exited_unseen: int
    lifetime_sum_ns: int
    lifetime_log2: tuple[int, ...]


@dataclass(frozen=True)
class LiveGoroutine:
    """A goroutine born while attached and not yet exited."""

    goid: int
    parent_goid: int
    gopc: int
    startpc: int
    created_ns: int
    stack_id: int


@dataclass
class TrackerReading:
    sites: dict[tuple[int, int], SiteCounts]
    live: dict[int, LiveGoroutine]
    counters: dict[str, int]
    creator_stacks: dict[int, list[int]] = field(default_factory=dict)


def _cflags(
    proc: GoProcess, sites: GoroutineProbeSites, *, stacks: bool, max_live: int, max_sites: int
) -> list[str]:
    off = proc.offsets
    flags = [
        f"-I{BPF_DIR}",
        f"-DG_GOID={off.g_goid}",
        f"-DG_GOPC={off.g_gopc}",
        f"-DG_STARTPC={off.g_startpc}",
        f"-DG_M={off.g_m}",
        f"-DM_CURG={off.m_curg}",
        f"-DMAX_LIVE={max_live}",
        f"-DLIVE_SLOTS={live_slots_for(max_live)}",
        f"-DMAX_SITES={max_sites}",
        # runqput(pp, newg, next): RBX is the second integer argument (ABIInternal);
        # newproc1 returns the new g in RAX.
        "-DCREATE_REG=" + ("bx" if sites.create_kind == "runqput_call" else "ax"),
    ]
    # One bpf_probe_read_user covers every g field a hit needs: a read costs the
    # same for 8 or 160 bytes, so fewer reads is what makes a hit cheaper.
    span = [off.g_goid, off.g_gopc, off.g_startpc]
    if off.g_parent_goid is not None:
        flags.append(f"-DG_PARENT_GOID={off.g_parent_goid}")
        span.append(off.g_parent_goid)
    span_start, span_end = min(span), max(span) + 8
    if span_end - span_start > MAX_SPAN:
        raise ProbeAttachError(
            f"runtime.g fields goid/gopc/startpc/parentGoid span {span_end - span_start} bytes "
            f"(at most {MAX_SPAN} fit one read on the BPF stack): this Go release's layout "
            "needs a probe update"
        )
    flags += [f"-DSPAN_START={span_start}", f"-DSPAN_WORDS={(span_end - span_start) // 8}"]
    if stacks:
        flags.append("-DWITH_STACKS=1")
    return flags


class GoroutineProbes:
    """The goroutine probes of one process. `attach()`, `read()`, `detach()`.

    Live goroutines are kept in a direct-mapped array (slot goid % live_slots) with a
    hash of max_live entries for those whose slot is taken, so up to
    live_slots + max_live are tracked before `live_table_full` counts a drop.
    """

    def __init__(
        self,
        proc: GoProcess,
        *,
        stacks: bool = False,
        max_live: int = DEFAULT_MAX_LIVE,
        max_sites: int = DEFAULT_MAX_SITES,
    ) -> None:
        self.proc = proc
        self.stacks = stacks
        self.max_live = max_live
        self.max_sites = max_sites
        self.sites = goroutine_probe_sites(proc.binary, proc.symbols.lookup)
        self._bpf = None  # bcc.BPF; falsy when it has no tables: test `is not None`
        self._attached: list[tuple[ProbeSite, str]] = []  # (site, BCC event name)
        self._compiled = False
        self._slots_mm: mmap.mmap | None = None

    # --- lifecycle ----------------------------------------------------------------

    def _exe(self) -> str:
        return f"/proc/{self.proc.pid}/exe"

    def compile(self) -> None:
        if self._bpf is not None:
            return
        from bcc import BPF  # the only package that imports bcc

        src = (BPF_DIR / "goroutines.bpf.c").read_text()
        try:
            self._bpf = BPF(
                text=src.encode(),
                cflags=_cflags(
                    self.proc,
                    self.sites,
                    stacks=self.stacks,
                    max_live=self.max_live,
                    max_sites=self.max_sites,
                ),
            )
        except Exception as exc:  # BCC raises bare Exception on compile errors
            raise ProbeAttachError(f"compiling goroutines.bpf.c failed: {exc}") from exc

    @property
    def create_sites(self) -> list[ProbeSite]:
        if self.sites.create_kind == "runqput_call" and self.sites.create is not None:
            return [self.sites.create]
        return list(self.sites.create_rets)

    @property
    def stepped_sites(self) -> int:
        """How many of the attached sites the kernel single-steps (cost model)."""
        return sum(1 for s, _ev in self._attached if not s.emulated)

    def attach(self) -> None:
        self.compile()
        assert self._bpf is not None
        plan: list[tuple[ProbeSite, str]] = [(s, "on_create") for s in self.create_sites]
        plan.append((self.sites.exit, "on_exit"))
        if self.stacks:
            plan.append((self.sites.newproc_entry, "on_newproc"))
        try:
            for site, fn in plan:
                ev = attach_at(self._bpf, self._exe(), site.file_offset, fn, self.proc.pid)
                self._attached.append((site, ev))
        except Exception as exc:
            self.detach()
            if not os.path.exists(f"/proc/{self.proc.pid}"):
                raise ProbeAttachError(f"PID {self.proc.pid} exited while attaching") from exc
            raise ProbeAttachError(f"attaching uprobes to PID {self.proc.pid}: {exc}") from exc

    @property
    def compiled(self) -> bool:
        return self._bpf is not None

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def detach(self) -> None:
        """Remove every uprobe (maps stay readable until close())."""
        if self._bpf is None:
            return
        for _site, ev in self._attached:
            detach(self._bpf, ev)
        self._attached.clear()

    def close(self) -> None:
        self.detach()
        if self._slots_mm is not None:
            self._slots_mm.close()
            self._slots_mm = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    # --- reading --------------------------------------------------------------------

    def _read_slots(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """The occupied slots of live_slots, read through an mmap of the array (one
        copy of the memory instead of a syscall per slot)."""
        assert self._bpf is not None
        n = live_slots_for(self.max_live)
        if self._slots_mm is None:
            size = n * _LIVE_SLOT.size
            size += -size % mmap.PAGESIZE
            fd = self._bpf["live_slots"].map_fd
            self._slots_mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        data = self._slots_mm[: n * _LIVE_SLOT.size]
        words = memoryview(data).cast("Q")
        stride = _LIVE_SLOT.size // 8
        goids = words[::stride].tolist()
        words.release()
        out = [
            _LIVE_SLOT.unpack_from(data, i * _LIVE_SLOT.size)
            for i in itertools.compress(range(n), goids)  # nonzero goids, found in C
            if goids[i] != _SLOT_WRITING
        ]
        # A slot freed and reused while copying shows a goid with another's info for
        # one reading at most; the copy is one memcpy, so that window is tiny.
        return [(g, pid, *info) for g, pid, _pad, *info in out]

    def _read_site_table(self, bias: int) -> dict[tuple[int, int], SiteCounts]:
        assert self._bpf is not None
        sites: dict[tuple[int, int], SiteCounts] = {}
        for k, per_cpu in self._bpf["site_stats"].items():
            key = (k.gopc - bias, k.startpc - bias)
            sites[key] = SiteCounts(
                gopc=key[0],
                startpc=key[1],
                created=sum(v.created for v in per_cpu),
                exited=sum(v.exited for v in per_cpu),
                exited_unseen=sum(v.exited_unseen for v in per_cpu),
                lifetime_sum_ns=sum(v.lifetime_sum_ns for v in per_cpu),
                lifetime_log2=tuple(
                    sum(v.lifetime_log2[i] for v in per_cpu) for i in range(LIFETIME_SLOTS)
                ),
            )
        return sites

    def _read_sites(self, bias: int) -> dict[tuple[int, int], SiteCounts]:
        """site_stats plus the births still pending in each CPU's site_cache. A birth
        moves from the cache to site_stats when its entry is taken (cache first, then
        the table): reading the table before and after the cache, and again if it
        changed meanwhile, counts each birth once."""
        assert self._bpf is not None
        before = self._read_site_table(bias)
        for _ in range(SITE_READ_TRIES):
            pending: dict[tuple[int, int], int] = {}
            for _idx, per_cpu in self._bpf["site_cache"].items():
                for e in per_cpu:
                    if e.created and e.pid == self.proc.pid:
                        key = (e.gopc - bias, e.startpc - bias)
                        pending[key] = pending.get(key, 0) + int(e.created)
            after = self._read_site_table(bias)
            stable = {k: v.created for k, v in after.items()} == {
                k: v.created for k, v in before.items()
            }
            before = after
            if stable:
                break
        # Still moving after the tries: a birth may be missed for this one reading
        # (never counted twice); the next reading finds it in site_stats.
        sites = dict(before)
        for key, n in pending.items():
            old = sites.get(key)
            sites[key] = (
                SiteCounts(key[0], key[1], n, 0, 0, 0, (0,) * LIFETIME_SLOTS)
                if old is None
                else dataclasses.replace(old, created=old.created + n)
            )
        return sites

    def read(self, *, with_live: bool = True) -> TrackerReading:
        assert self._bpf is not None
        bias = self.proc.load_bias
        counters = {name: 0 for name in COUNTER_NAMES}
        for idx, per_cpu in self._bpf["counters"].items():
            if idx.value < len(COUNTER_NAMES):
                counters[COUNTER_NAMES[idx.value]] = sum(int(v) for v in per_cpu)

        sites = self._read_sites(bias)

        live: dict[int, LiveGoroutine] = {}
        if with_live:
            table = self._bpf["live_goroutines"]
            try:
                items = table.items_lookup_batch()  # ~8x faster than items() at 100k
            except Exception:
                items = table.items()
            for goid, slot_pid, parent, gopc, startpc, created_ns, stack_id in self._read_slots():
                if slot_pid == self.proc.pid:
                    live[goid] = LiveGoroutine(
                        goid=goid,
                        parent_goid=parent,
                        gopc=gopc - bias,
                        startpc=startpc - bias,
                        created_ns=created_ns,
                        stack_id=stack_id,
                    )
            for k, v in items:
                live[k.goid] = LiveGoroutine(
                    goid=k.goid,
                    parent_goid=v.parent_goid,
                    gopc=v.gopc - bias,
                    startpc=v.startpc - bias,
                    created_ns=v.created_ns,
                    stack_id=v.stack_id,
                )
        stacks: dict[int, list[int]] = {}
        if self.stacks and with_live:
            table = self._bpf["creator_stacks"]
            for sid in {g.stack_id for g in live.values() if g.stack_id >= 0}:
                with contextlib.suppress(KeyError):
                    stacks[sid] = [pc - bias for pc in table.walk(sid)]
        return TrackerReading(sites=sites, live=live, counters=counters, creator_stacks=stacks)
