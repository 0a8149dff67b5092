"""One compiled bpf/funclat.bpf.c for one process: its probes attached in groups,
its maps read into plain dicts and histograms.

The scheduler (funclat.py) and the panic probes (panics.py) each drive one.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from goleash.gobin.disasm import ProbeSite
from goleash.probes import hist
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
)


class CtlView(ctypes.Structure):
    """struct fl_ctl in bpf/goleash.h: what user space writes per function. A view of
    our own (not BCC's Leaf) so a field renamed on one side fails a test instead of
    becoming a new Python attribute nobody reads."""

    _fields_ = [("epoch", ctypes.c_uint32), ("timing", ctypes.c_uint32)]


@dataclass
class RawReading:
    """One function's cumulative figures since attach, as the maps hold them."""

    stats: dict[str, int]
    hist: Histogram


class LatencyProgram:
    """One compiled funclat.bpf.c for one process (functions, goexit1, gopanic).

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
        from bcc import BPF  # probes is the only package that imports bcc

        self.proc = proc
        off = proc.offsets
        flags = [
            f"-I{BPF_DIR}",
            f"-DG_GOID={off.g_goid}",
            f"-DG_STACK_HI={off.g_stack_hi}",
            f"-DFL_NFUNCS={max(1, len(sites))}",
            f"-DFL_MAX_GOROUTINES={max_goroutines}",
            f"-DFL_MAX_PANIC_SITES={max_panic_sites}",
            f"-DFL_PANIC_SP_ADJ={panic_sp_adj}",
            *(f"-D{k}={v}" for k, v in hist.c_defines().items()),
        ]
        text = (BPF_DIR / "funclat.bpf.c").read_text()
        text += "".join(f"FL_FUNC({i}, {s.sp_adj})\n" for i, s in enumerate(sites))
        try:
            self.bpf: Any = BPF(text=text, cflags=flags)
        except Exception as exc:  # BCC raises bare Exception on compile errors
            raise FuncProbeError(f"compiling funclat.bpf.c failed: {exc}") from exc
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

    def set_ctl(self, fid: int, epoch: int, timing: bool) -> None:
        """Whether the function's entries are timed now, and its RET probes' epoch."""
        self.bpf["fl_ctl"][ctypes.c_int(fid)] = CtlView(epoch & 0xFFFFFFFF, int(timing))

    def stats(self, fid: int) -> dict[str, int]:
        """Cumulative figures; entry_hits is every call the entry probe counted."""
        v = self.bpf["fl_stats"][ctypes.c_int(fid)]
        out = {name: int(getattr(v, name)) for name in STAT_FIELDS}
        out["entry_hits"] = sum(int(x) for x in self.bpf["fl_calls"][ctypes.c_int(fid)])
        return out

    def raw(self, fid: int) -> RawReading:
        st = self.stats(fid)
        counts = [int(x) for x in self.bpf["fl_hist"][ctypes.c_int(fid)].b[: hist.N_BUCKETS]]
        return RawReading(st, Histogram(counts, st["count"], st["sum_ns"], st["max_ns"]))

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTER_NAMES, 0)
        for idx, per_cpu in self.bpf["fl_counters"].items():
            if idx.value < len(COUNTER_NAMES):
                out[COUNTER_NAMES[idx.value]] = sum(int(x) for x in per_cpu)
        return out

    def close(self) -> None:
        for group in list(self._groups):
            self.detach(group)
        self._queue.put(None)
        self._worker.join()
        self.bpf.cleanup()
