"""bpf/funclat.bpf.c loaded for one process: its probes attached in groups, its maps
read into plain dicts and histograms.

The program is compiled once per node, not once per process: the image cache
(bpfimage.py) holds it, bpfload.py creates a process's maps and loads the programs
it attaches with bpf(2), so following a process with function probes neither
compiles nor maps LLVM. What differs per process is data: fl_config (runtime.g
offsets, gopanic's SP adjustment), fl_sites (each probe site's address in the
process: its function and SP adjustment) and the maps' sizes. The scheduler
(funclat.py) and the panic probes (panics.py) each drive one.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from goleash.errors import GoleashError
from goleash.gobin.disasm import ProbeSite
from goleash.probes import hist
from goleash.probes.bpfload import LoadedBpf, Origin, open_program
from goleash.probes.bpfsrc import bpf_dir
from goleash.probes.funcsites import FuncProbeError, FuncSites
from goleash.probes.hist import Histogram
from goleash.probes.target import GoProcess
from goleash.probes.uprobe import GroupAttacher

BPF_DIR = bpf_dir()
# struct fl_stats in bpf/goleash.h, in its order (tests/bpf/test_layouts.py checks it).
STAT_FIELDS = (
    "count",
    "sum_ns",
    "max_ns",
    "entry_hits",
    "ret_hits",
    "unmatched",
    "stale",
    "migrated",
    "overflow",
    "opened",
    "expired",
    "ret_nop_hits",
)
# enum fl_counter in bpf/goleash.h: FL_CNT_<NAME> is at index COUNTER_NAMES.index(name).
COUNTER_NAMES = (
    "inflight_new",
    "inflight_del",
    "inflight_full",
    "exit_hits",
    "exit_cleaned",
    "panic_hits",
    "panic_sites_full",
    "read_faults",
    "unknown_sites",
)


class CtlView(ctypes.Structure):
    """struct fl_ctl in bpf/goleash.h: what user space writes per function. The views
    here are held to goleash.h by tests/bpf/test_layouts.py."""

    _fields_ = [
        ("epoch", ctypes.c_uint32),
        ("timing", ctypes.c_uint32),
        ("from_ns", ctypes.c_uint64),
        ("until_ns", ctypes.c_uint64),
    ]


class SiteView(ctypes.Structure):
    """struct fl_site: fl_sites' value, keyed by the site's address in the process."""

    _fields_ = [("fid", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("sp_adj", ctypes.c_uint64)]


class ConfigView(ctypes.Structure):
    """struct fl_config: the process's facts, fl_config[0]."""

    _fields_ = [
        ("g_goid", ctypes.c_uint64),
        ("g_stack_hi", ctypes.c_uint64),
        ("panic_sp_adj", ctypes.c_uint64),
    ]


class StatsView(ctypes.Structure):
    """struct fl_stats, fields named as STAT_FIELDS."""

    _fields_ = [(name, ctypes.c_uint64) for name in STAT_FIELDS]


class HistView(ctypes.Structure):
    """struct fl_hist in funclat.bpf.c: GL_FL_SLOTS buckets (the first N_BUCKETS used)."""

    _fields_ = [("b", ctypes.c_uint64 * hist.SLOTS)]


class PanicKeyView(ctypes.Structure):
    """struct fl_panic_key."""

    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("pcs", ctypes.c_uint64 * 4),  # FL_PANIC_FRAMES
    ]


class GoroutineKeyView(ctypes.Structure):
    """struct goroutine_key: fl_inflight's key."""

    _fields_ = [("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("goid", ctypes.c_uint64)]


class FrameView(ctypes.Structure):
    """struct fl_frame."""

    _fields_ = [
        ("start_ns", ctypes.c_uint64),
        ("depth", ctypes.c_uint64),
        ("fid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class InflightView(ctypes.Structure):
    """struct fl_inflight: a goroutine's calls in flight."""

    _fields_ = [
        ("n", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("frames", FrameView * 16),  # FL_MAX_DEPTH
    ]


_Index = ctypes.c_uint32
NEVER_NS = 2**64 - 1  # fl_ctl.until_ns of a window that has no planned end
# The maps user space opens: name -> (key, value) views (per-CPU values: one per CPU).
_MAPS = {
    "fl_config": (_Index, ConfigView),
    "fl_sites": (ctypes.c_uint64, SiteView),
    "fl_stats": (_Index, StatsView),
    "fl_hist": (_Index, HistView),
    "fl_ctl": (_Index, CtlView),
    "fl_calls": (_Index, ctypes.c_uint64),
    "fl_panics": (PanicKeyView, ctypes.c_uint64),
    "fl_inflight": (GoroutineKeyView, InflightView),
    "fl_counters": (_Index, ctypes.c_uint64),
}


def cflags() -> list[str]:
    """The same for every process (the image cache's key includes them)."""
    return [f"-I{BPF_DIR}", *(f"-D{k}={v}" for k, v in hist.c_defines().items())]


@dataclass
class RawReading:
    """One function's cumulative figures since attach, as the maps hold them."""

    stats: dict[str, int]
    hist: Histogram


class LatencyProgram:
    """funclat.bpf.c loaded for one process (functions, goexit1, gopanic).

    Probes are attached in groups (a function's entry, its RETs, goexit1, gopanic),
    each group one uprobe_multi link where the kernel has them, else one perf-event
    uprobe per site (probes/uprobe.py says why groups: what a detach costs).
    Detaching runs on a worker thread so a duty cycle never stalls on it.
    """

    def __init__(
        self,
        proc: GoProcess,
        sites: Sequence[FuncSites],
        *,
        max_goroutines: int,
        max_panic_sites: int,
        panic_sp_adj: int,
    ) -> None:
        self.proc = proc
        # Each probe site by its address in the process (where the program finds it).
        by_addr: dict[int, SiteView] = {}
        for fid, s in enumerate(sites):
            by_addr[s.entry.vaddr + proc.load_bias] = SiteView(fid, 0, s.sp_adj)
            for r in (*s.rets, *s.ret_nops):
                by_addr[r.vaddr + proc.load_bias] = SiteView(fid, 0, 0)
        self.bpf, self.origin = load_program(
            len(sites), len(by_addr), max_goroutines, max_panic_sites
        )
        try:
            cfg = self.bpf["fl_config"]
            cfg[_Index(0)] = ConfigView(proc.offsets.g_goid, proc.offsets.g_stack_hi, panic_sp_adj)
            table = self.bpf["fl_sites"]
            for addr, site in by_addr.items():
                table[ctypes.c_uint64(addr)] = site
        except BaseException:
            self.bpf.cleanup()
            raise
        self._attacher = GroupAttacher(self.bpf, proc.exe, proc.pid)
        self._groups: dict[str, Callable[[], None]] = {}  # attached group -> its detach
        self._pending: dict[str, threading.Event] = {}
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._detach_loop, daemon=True)
        self._worker.start()

    def attach(self, group: str, sites: Sequence[ProbeSite], fn_name: str) -> None:
        """Attach BPF function `fn_name` at every site, as one group."""
        ev = self._pending.get(group)
        if ev is not None:
            ev.wait()
        try:
            self._groups[group] = self._attacher.attach([s.file_offset for s in sites], fn_name)
        except Exception as exc:
            if not self.proc.alive():
                raise FuncProbeError(f"PID {self.proc.pid} exited while attaching") from exc
            raise FuncProbeError(
                f"attaching uprobes to {sites[0].symbol} in PID {self.proc.pid}: {exc}"
            ) from exc

    def attached(self, group: str) -> bool:
        return group in self._groups

    def detach(self, group: str) -> None:
        """Queue the group's removal; returns at once."""
        undo = self._groups.pop(group, None)
        if undo is None:
            return
        self._pending[group] = ev = threading.Event()

        def run() -> None:
            try:
                undo()
            finally:
                ev.set()

        self._queue.put(run)

    def busy(self, group: str) -> bool:
        """The group's previous probes are still being removed."""
        ev = self._pending.get(group)
        return ev is not None and not ev.is_set()

    def _detach_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with contextlib.suppress(Exception):
                job()

    def set_ctl(
        self, fid: int, epoch: int, timing: bool, from_ns: int = 0, until_ns: int = NEVER_NS
    ) -> None:
        """Whether the function's entries are timed, in which window of the kernel's
        clock (time.monotonic_ns(): both are CLOCK_MONOTONIC), and its RET probes' epoch."""
        self.bpf["fl_ctl"][_Index(fid)] = CtlView(
            epoch & 0xFFFFFFFF, int(timing), max(0, from_ns), min(NEVER_NS, max(0, until_ns))
        )

    def stats(self, fid: int) -> dict[str, int]:
        """Cumulative figures; entry_hits is every call the entry probe counted."""
        v = self.bpf["fl_stats"][_Index(fid)]
        out = {name: int(getattr(v, name)) for name in STAT_FIELDS}
        out["entry_hits"] = sum(int(x) for x in self.bpf["fl_calls"][_Index(fid)])
        return out

    def raw(self, fid: int) -> RawReading:
        st = self.stats(fid)
        counts = [int(x) for x in self.bpf["fl_hist"][_Index(fid)].b[: hist.N_BUCKETS]]
        return RawReading(st, Histogram(counts, st["count"], st["sum_ns"], st["max_ns"]))

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTER_NAMES, 0)
        for idx, per_cpu in self.bpf["fl_counters"].items():  # a few entries
            if idx.value < len(COUNTER_NAMES):
                out[COUNTER_NAMES[idx.value]] = sum(int(x) for x in per_cpu)
        return out

    def close(self) -> None:
        for group in list(self._groups):
            self.detach(group)
        self._queue.put(None)
        self._worker.join()
        self.bpf.cleanup()


_loads = 0


def load_count() -> int:
    """How many times this Python process loaded funclat.bpf.c (one per traced process
    and kind of probe; each a load of the one image, never a compile here)."""
    return _loads


def load_program(
    nfuncs: int, nsites: int, max_goroutines: int, max_panic_sites: int
) -> tuple[LoadedBpf, Origin]:
    """The image loaded with maps of this process's sizes: from the node's cache, or
    compiled in a child process and cached. The programs the caller will attach are
    checked by the kernel at once, so a cached image it refuses is compiled again here
    (they are loaded again at attach, for uprobe_multi links)."""
    global _loads
    per_func = max(1, nfuncs)
    sizes = {
        "fl_sites": max(1, nsites),
        "fl_stats": per_func,
        "fl_hist": per_func,
        "fl_ctl": per_func,
        "fl_calls": per_func,
        "fl_inflight": max_goroutines,
        "fl_panics": max_panic_sites,
    }
    try:
        bpf, origin = open_program(
            "funclat",
            BPF_DIR / "funclat.bpf.c",
            cflags(),
            verify=("fl_entry", "fl_ret", "fl_retnop", "fl_goexit") if nfuncs else ("fl_panic",),
            sizes=sizes,
        )
    except (GoleashError, OSError) as exc:
        raise FuncProbeError(f"loading funclat.bpf.c failed: {exc}") from exc
    try:
        for name, (key, value) in _MAPS.items():
            bpf.map(name, key, value)
    except (GoleashError, KeyError) as exc:
        bpf.cleanup()
        raise FuncProbeError(f"funclat.bpf.c and funcprog.py disagree: {exc}") from exc
    _loads += 1
    return bpf, origin
