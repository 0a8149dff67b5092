"""BCC side of function latency and panics: compile bpf/funclat.bpf.c for one process,
attach at the sites disassembly chose, read the kernel's histograms as per-interval
deltas, and keep the probes' cost under the process's overhead budget.

Cost model (see probes/budget.py): an entry hit on an emulated instruction is cheap, a
RET hit is single-stepped, so a traced call costs one cheap and one expensive hit. The
only cheaper return site Go code offers is a NOP the compiler sometimes leaves right
before a RET (~3% of them); elsewhere the RET follows `add rsp`/`pop rbp` (Go >= 1.21)
or `mov rbp`/`add rsp` (1.19), none emulated. A function whose calls would cost more
than its share of the budget is sampled: its calls are timed during a slice of each
interval placed at random in it (timing is a flag in a map the entry probe reads; RETs
are attached for the slice and left on until the calls entered in it have returned, so
long calls are not biased out), and its figures say so. The entry probe stays attached
and counts every call, so `calls` stays exact; only when even counting costs more than
the share is the entry probe sampled too, and `calls` is an estimate with its bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from goleash.errors import GoleashError
from goleash.gobin.disasm import ProbeSite, disassemble, emulated_entry_site, function_probes
from goleash.probes import hist
from goleash.probes.bpfsrc import bpf_dir
from goleash.probes.budget import OverheadBudget
from goleash.probes.funcs import TracedFunction
from goleash.probes.hist import Histogram
from goleash.probes.target import GoProcess

BPF_DIR = bpf_dir()
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
DEFAULT_MAX_GOROUTINES = 16384
DEFAULT_MAX_PANIC_SITES = 1024
POLL_S = 0.05  # how often a sampled function's slice is checked against its share

# bpf(2) for uprobe_multi links (Linux >= 6.6), which BCC 0.26 does not wrap.
_SYS_BPF = 321  # x86-64
_BPF_LINK_CREATE = 28
_BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type
_BPF_ATTR_SIZE = 128
_libc = ctypes.CDLL(None, use_errno=True)


class FuncProbeError(GoleashError):
    """BCC could not compile or attach the function-latency probes."""


# --- where the probes go -------------------------------------------------------------


@dataclass(frozen=True)
class FuncSites:
    symbol: str
    entry: ProbeSite
    sp_adj: int  # bytes the function lowered SP before `entry` (0 at its first instruction)
    rets: tuple[ProbeSite, ...]  # the RETs themselves (single-stepped)
    tail_calls: int  # exits by `jmp` that no RET probe sees
    # Emulated stand-ins for some RETs: a NOP right before a RET that nothing jumps to
    # (SP is already what the RET sees). Go leaves one before ~3% of its RETs.
    ret_nops: tuple[ProbeSite, ...] = ()


def _sp_lowered(binary: Any, start: ProbeSite, site: ProbeSite) -> int | None:
    """How far SP moved down between two sites on a straight line, or None if some
    instruction there changes SP in a way not followed."""
    if site.vaddr == start.vaddr:
        return 0
    delta = 0
    for ins in disassemble(binary, start.vaddr, site.vaddr - start.vaddr):
        if "rsp" not in ins.writes:
            continue
        ops = ins.op_str.split(", ")
        if ins.mnemonic == "push":
            delta += 8
        elif ins.mnemonic == "pop":
            delta -= 8
        elif ins.mnemonic in ("sub", "add") and ops[0] == "rsp" and len(ops) == 2:
            try:
                n = int(ops[1], 0)
            except ValueError:
                return None
            delta += n if ins.mnemonic == "sub" else -n
        else:
            return None
    return delta


def function_sites(proc: GoProcess, fn: TracedFunction) -> FuncSites:
    """Entry after the stack check on the cheapest once-per-call instruction that still
    has R14 (on Go 1.19 that is past `sub rsp`, hence sp_adj), and every RET."""
    fp = function_probes(proc.binary, fn.symbol, fn.addr, fn.size)
    entry, adj = fp.entry_probe, _sp_lowered(proc.binary, fp.after_check, fp.entry_probe)
    if adj is None:
        entry, adj = fp.after_check, 0
    if not fp.rets:
        raise FuncProbeError(
            f"{fn.symbol} has no RET instruction (it never returns, or leaves only by tail "
            "calls): there is nothing to time"
        )
    rets, nops = _return_sites(proc, fn, fp.rets)
    return FuncSites(fn.symbol, entry, adj, rets, len(fp.tail_calls), nops)


def _return_sites(
    proc: GoProcess, fn: TracedFunction, rets: Sequence[ProbeSite]
) -> tuple[tuple[ProbeSite, ...], tuple[ProbeSite, ...]]:
    """Split the RETs into those probed where they are and emulated NOPs standing in
    for the others. A NOP stands in only on a straight line: the RET is no jump target,
    and the function has no indirect jump (a jump table could land on the RET)."""
    insns = disassemble(proc.binary, fn.addr, fn.size)
    if any(i.mnemonic == "jmp" and i.target is None for i in insns):
        return tuple(rets), ()
    targets = {i.target for i in insns if i.target is not None}
    before = {b.address: a for a, b in zip(insns, insns[1:], strict=False)}
    stepped: list[ProbeSite] = []
    nops: list[ProbeSite] = []
    for r in rets:
        prev = before.get(r.vaddr)
        if (
            prev is not None
            and prev.mnemonic == "nop"
            and prev.is_emulated
            and r.vaddr not in targets  # a jump to the NOP still passes it: fine
        ):
            nops.append(
                ProbeSite(
                    r.symbol,
                    prev.address,
                    proc.binary.vaddr_to_offset(prev.address),
                    prev.text,
                    True,
                )
            )
        else:
            stepped.append(r)
    return tuple(stepped), tuple(nops)


def runtime_site(proc: GoProcess, name: str, keep: tuple[str, ...]) -> tuple[ProbeSite, int]:
    found = proc.symbols.require(name)
    fp = function_probes(proc.binary, name, *found)
    site = emulated_entry_site(proc.binary, name, *found, keep=keep)
    adj = _sp_lowered(proc.binary, fp.after_check, site)
    if adj is None:
        return fp.after_check, 0
    return site, adj


# --- what a window of time holds -----------------------------------------------------


# Calls estimated from a sampled entry probe carry this many standard deviations of
# error (Poisson counts: ~95% of intervals land inside), see FunctionLatency.calls_error.
CALLS_ERROR_SIGMAS = 2.0
# Two-sided 95% quantiles of Student's t for 1, 2, ... degrees of freedom (then ~2).
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.2, 2.18, 2.16, 2.14)


@dataclass
class FunctionLatency:
    """One function over a window: every call counted, the calls timed, how it was watched.

    `calls` is exact while the (cheap, emulated) entry probe stays attached, which it
    does unless even counting costs more than the budget; then it is an estimate with
    an error bound. `timed` (the histogram's count) are the calls the quantiles come
    from: timing is duty-cycled when the single-stepped RET probes are over budget."""

    symbol: str
    hist: Histogram = field(default_factory=Histogram)
    window_s: float = 0.0
    attached_s: float = 0.0  # time its calls were timed in the window
    entry_hits: int = 0  # calls counted by the entry probe
    exact_calls: int = 0  # calls in intervals the entry probe covered whole
    sampled_hits: int = 0  # calls counted in intervals it covered only in part ...
    sampled_counted_s: float = 0.0  # ... during this much of them ...
    sampled_window_s: float = 0.0  # ... of this long
    # Per partly counted interval, its rate (calls/s while counted): n, sum, sum of
    # squares, for an error bound that also holds when calls come in bursts.
    rate_n: int = 0
    rate_sum: float = 0.0
    rate_sq: float = 0.0
    ret_hits: int = 0  # at RET instructions (single-stepped)
    ret_nop_hits: int = 0  # at NOPs standing in for a RET (emulated)
    unmatched: int = 0  # RETs of calls entered before attach (or not recorded)
    stale: int = 0  # calls that never returned (panic, Goexit) or were lost
    migrated: int = 0  # timed calls that returned on another thread
    overflow: int = 0  # calls not recorded: too deep a nest of traced calls in flight
    cut: int = 0  # calls whose RET probes sampling detached while they ran: not timed
    sampled: bool = False  # over budget: calls were timed only part of the window
    # Bucket counts with each interval's timed calls weighted by its calls / timed, so
    # an interval timed for a larger share of its calls does not weigh more in the
    # quantiles (None: no interval was sampled, the plain counts).
    weighted: list[float] | None = None

    @property
    def timed(self) -> int:
        return self.hist.count

    @property
    def count(self) -> int:
        """The calls timed (kept for readers of the histogram; `calls` counts all)."""
        return self.hist.count

    @property
    def calls_exact(self) -> bool:
        return self.sampled_window_s == 0

    @property
    def calls(self) -> int:
        """Every call in the window: exact, or scaled up from the counted part."""
        if self.calls_exact or self.sampled_counted_s <= 0:
            return self.exact_calls + self.sampled_hits
        scale = self.sampled_window_s / self.sampled_counted_s
        return self.exact_calls + round(self.sampled_hits * scale)

    @property
    def calls_error(self) -> float | None:
        """Half-width of the estimate's ~95% band (calls arriving at a steady rate over
        the window, Poisson counts); 0 when exact, None when no call could be counted."""
        if self.calls_exact:
            return 0.0
        if self.sampled_counted_s <= 0:
            return None
        scale = self.sampled_window_s / self.sampled_counted_s
        poisson = math.sqrt(self.sampled_hits + 1) * scale
        # Calls often come in bursts (more spread than Poisson): the spread of the
        # rates seen from one interval to the next bounds the estimate too.
        spread = 0.0
        n = self.rate_n
        if n >= 2:
            mean = self.rate_sum / n
            var = max(0.0, (self.rate_sq - n * mean * mean) / (n - 1))
            # Student's t for n - 1 degrees of freedom: few intervals, a wider band.
            t = _T95[min(n - 1, len(_T95)) - 1]
            spread = t * math.sqrt(var / n) * self.sampled_window_s
        return max(CALLS_ERROR_SIGMAS * poisson, spread)

    @property
    def attached_fraction(self) -> float:
        """Share of the window its calls were timed."""
        return self.attached_s / self.window_s if self.window_s else 0.0

    def __add__(self, other: FunctionLatency) -> FunctionLatency:
        out = FunctionLatency(self.symbol, self.hist + other.hist)
        out.sampled = self.sampled or other.sampled
        if self.weighted is not None or other.weighted is not None:
            a = self.weighted if self.weighted is not None else self.hist.counts
            b = other.weighted if other.weighted is not None else other.hist.counts
            out.weighted = [x + y for x, y in zip(a, b, strict=True)]
        for name in (
            "window_s",
            "attached_s",
            "entry_hits",
            "exact_calls",
            "sampled_hits",
            "sampled_counted_s",
            "sampled_window_s",
            "rate_n",
            "rate_sum",
            "rate_sq",
            "ret_hits",
            "ret_nop_hits",
            "unmatched",
            "stale",
            "migrated",
            "overflow",
            "cut",
        ):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def quantile_ns(self, q: float) -> float | None:
        counts = self.weighted if self.weighted is not None else self.hist.counts
        v = hist.quantile(counts, q, self.hist.max_ns)
        return None if v != v else v  # NaN when no call was timed

    def to_dict(self) -> dict[str, Any]:
        def ns(q: float) -> int | None:
            v = self.quantile_ns(q)
            return None if v is None else round(v)

        err = self.calls_error
        return {
            "symbol": self.symbol,
            "calls": self.calls,
            "calls_exact": self.calls_exact,
            "calls_error": None if err is None else round(err, 1),
            "timed": self.timed,
            "p50_ns": ns(0.5),
            "p90_ns": ns(0.9),
            "p99_ns": ns(0.99),
            "p999_ns": ns(0.999),
            "max_ns": self.hist.max_ns if self.timed else None,
            "mean_ns": round(self.hist.mean_ns) if self.timed else None,
            "sum_ns": self.hist.sum_ns,
            "sampled": self.sampled,
            "timed_fraction": round(self.attached_fraction, 4),
            "stale": self.stale,
            "unmatched": self.unmatched,
            "migrated": self.migrated,
            "overflow": self.overflow,
            "cut": self.cut,
            # The kernel's log-linear buckets (probes/hist.py: sub_bucket_bits), only
            # the non-empty ones: [index, lo_ns, hi_ns (exclusive), count].
            "histogram": {
                "sub_bucket_bits": hist.SUB_BITS,
                "buckets": [
                    [i, *hist.bucket_bounds(i), c] for i, c in enumerate(self.hist.counts) if c
                ],
            },
        }


@dataclass
class IntervalReading:
    start: float  # time.monotonic()
    end: float
    functions: list[FunctionLatency]
    counters: dict[str, int]  # deltas over the interval
    cost_fraction: float  # of one core, what the probes cost the process
    cleanup_at_exit: bool  # goexit1 probe attached (else stale calls age out of the LRU)


@dataclass
class _Raw:
    stats: dict[str, int]
    hist: Histogram


@dataclass
class _FuncState:
    sites: FuncSites
    fid: int
    entry_on: bool = False  # entry probe attached: every call is counted
    timing: bool = False  # the kernel times entries (fl_ctl.timing)
    rets_on: bool = False
    # The entry probe stays attached between timing slices (counting every call) when
    # it is emulated and its own cost fits the function's share.
    count_always: bool = True
    entry_since: float = 0.0  # when the entry probe was last attached
    timing_since: float = 0.0  # when timing was last switched on
    entry_gap: bool = False  # the entry probe was off at some time since the last read
    counted_s: float = 0.0  # entry-attached time since the last read, closed stretches
    baseline_inflight: int = 0  # calls in flight when this slice started
    # Costs when last measured: RET probes per second attached, entries per second
    # timed when the entry probe is attached only to time, entries per second counted.
    rate: float | None = None
    timed_entry_rate: float = 0.0
    entry_rate: float | None = None
    rets_since: float = 0.0  # when the RET probes were last attached
    rets_s: float = 0.0  # RET-attached time since the last read, closed stretches
    drain_s: float = 0.0  # how long RETs stayed on after a slice, waiting for its calls
    epoch: int = 0  # attachments of its RET probes (fl_ctl.epoch in the kernel)
    last: _Raw | None = None


# --- the probes ----------------------------------------------------------------------


class LatencyProgram:
    """One compiled funclat.bpf.c for one process (functions, goexit1, gopanic).

    Probes are attached in groups (a function's entry, its RETs, goexit1, gopanic),
    each group as one uprobe_multi BPF link when the kernel has them (Linux >= 6.6):
    closing a uprobe costs the kernel an RCU grace period (~0.1 s here for each perf-event
    uprobe, serialized; ~0.04 s for a whole link), though the breakpoints leave the
    process at once. Older kernels get one perf-event uprobe per site through BCC.
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
        self.multi: bool | None = None  # uprobe_multi links work here (None: not tried)
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
            if self.multi is not False:
                try:
                    self._groups[group] = self._attach_multi(sites, fn_name)
                    self.multi = True
                    return
                except OSError:
                    if self.multi:
                        raise
                    self.multi = False  # no uprobe_multi here: reload for perf events
                    fn = self.bpf.funcs.pop(fn_name.encode(), None)
                    if fn is not None:
                        os.close(fn.fd)
            self._groups[group] = self._attach_perf(sites, fn_name)
        except Exception as exc:
            if not self.proc.alive():
                raise FuncProbeError(f"PID {self.proc.pid} exited while attaching") from exc
            raise FuncProbeError(
                f"attaching uprobes to {sites[0].symbol} in PID {self.proc.pid}: {exc}"
            ) from exc

    def _attach_multi(self, sites: Sequence[ProbeSite], fn_name: str) -> Callable[[], None]:
        from bcc import BPF

        fn = self.bpf.load_func(fn_name, BPF.KPROBE, attach_type=_BPF_TRACE_UPROBE_MULTI)
        offsets = (ctypes.c_uint64 * len(sites))(*(s.file_offset for s in sites))
        path = ctypes.create_string_buffer(self.proc.exe.encode())
        attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
        # union bpf_attr.link_create: prog_fd, target_fd, attach_type, flags, then
        # uprobe_multi: path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid.
        struct.pack_into("<IIII", attr, 0, fn.fd, 0, _BPF_TRACE_UPROBE_MULTI, 0)
        struct.pack_into(
            "<QQQQIII",
            attr,
            16,
            ctypes.addressof(path),
            ctypes.addressof(offsets),
            0,
            0,
            len(sites),
            0,
            self.proc.pid,
        )
        fd = _libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, attr, _BPF_ATTR_SIZE)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"uprobe_multi link: {os.strerror(err)}")
        return lambda: os.close(fd)

    def _attach_perf(self, sites: Sequence[ProbeSite], fn_name: str) -> Callable[[], None]:
        done: list[ProbeSite] = []

        def detach() -> None:
            for s in done:
                # When the process is gone, the kernel dropped the probe with it.
                with contextlib.suppress(Exception):
                    self.bpf.detach_uprobe(name=self.proc.exe, addr=s.vaddr, pid=self.proc.pid)

        try:
            for s in sites:
                # BCC 0.26 takes `addr` as a link-time virtual address of the ELF file
                # and turns it into the file offset itself (a file offset fails there).
                self.bpf.attach_uprobe(
                    name=self.proc.exe, addr=s.vaddr, fn_name=fn_name, pid=self.proc.pid
                )
                done.append(s)
        except Exception:
            detach()
            raise
        return detach

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
        tab = self.bpf["fl_ctl"]
        v = tab.Leaf()
        v.epoch, v.timing = epoch & 0xFFFFFFFF, int(timing)
        tab[ctypes.c_int(fid)] = v

    def stats(self, fid: int) -> dict[str, int]:
        """Cumulative figures; entry_hits is every call the entry probe counted."""
        v = self.bpf["fl_stats"][ctypes.c_int(fid)]
        out = {name: int(getattr(v, name)) for name in STAT_FIELDS}
        out["entry_hits"] = sum(int(x) for x in self.bpf["fl_calls"][ctypes.c_int(fid)])
        return out

    def raw(self, fid: int) -> _Raw:
        st = self.stats(fid)
        counts = [int(x) for x in self.bpf["fl_hist"][ctypes.c_int(fid)].b[: hist.N_BUCKETS]]
        return _Raw(st, Histogram(counts, st["count"], st["sum_ns"], st["max_ns"]))

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


class FuncLatencyProbes:
    """Latency of chosen functions in one process: `attach()`, then `run_interval(s)`
    repeatedly (each returns that interval's figures), then `close()`."""

    def __init__(
        self,
        proc: GoProcess,
        functions: Sequence[TracedFunction],
        *,
        budget: OverheadBudget | None = None,
        cleanup_at_exit: bool = True,
        max_goroutines: int = DEFAULT_MAX_GOROUTINES,
    ) -> None:
        self.proc = proc
        self.budget = budget if budget is not None else OverheadBudget()
        if not self.budget.cpu_fraction > 0:
            raise FuncProbeError(
                "a budget of 0 allows the probes no cost at all: nothing can be counted or "
                "timed (give a share of a core, or no limit)"
            )
        self.funcs = [_FuncState(function_sites(proc, fn), i) for i, fn in enumerate(functions)]
        self.exit_site, _ = runtime_site(proc, "runtime.goexit1", ("r14",))
        self.cleanup_at_exit = cleanup_at_exit
        self.max_goroutines = max_goroutines
        self._prog: LatencyProgram | None = None
        self._last_counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._exit_rate: float | None = None  # goexit1 cost, ns per second
        self._last_read = 0.0  # time.monotonic() of the last reading
        self._rng = random.Random()

    @property
    def notes(self) -> list[str]:
        out = []
        for f in self.funcs:
            if f.sites.tail_calls:
                out.append(
                    f"{f.sites.symbol}: {f.sites.tail_calls} exit(s) by tail call are not "
                    "timed (no RET there)"
                )
            if not f.sites.entry.emulated:
                out.append(
                    f"{f.sites.symbol}: no emulated entry site; its entry probe is "
                    "single-stepped (dearer)"
                )
        return out

    # --- lifecycle -------------------------------------------------------------------

    def attach(self) -> None:
        if self._prog is not None:
            return
        self._prog = LatencyProgram(
            self.proc,
            [f.sites for f in self.funcs],
            max_goroutines=self.max_goroutines,
            max_panic_sites=1,
            panic_sp_adj=0,
        )
        try:
            if self.cleanup_at_exit:
                self._prog.attach("goexit", [self.exit_site], "fl_goexit")
            for f in self.funcs:
                f.count_always = f.sites.entry.emulated and self.budget.cpu_fraction > 0
                self._timing_on(f, time.monotonic())
                f.last = self._prog.raw(f.fid)
        except BaseException:
            self.close()
            raise
        self._last_counters = self._prog.counters()
        self._last_read = time.monotonic()

    def close(self) -> None:
        if self._prog is not None:
            self._prog.close()
            self._prog = None

    def __enter__(self) -> FuncLatencyProbes:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timing_on(self, f: _FuncState, now: float) -> None:
        """Start a timing slice: RET probes first, so no timed entry lacks its RET."""
        assert self._prog is not None
        st = self._prog.stats(f.fid)
        f.baseline_inflight = _inflight(st)
        if not f.rets_on:
            # A new epoch: frames entered before may have returned while RETs were off.
            f.epoch += 1
            self._prog.set_ctl(f.fid, f.epoch, False)
            if f.sites.rets:
                self._prog.attach(f"rets:{f.fid}", f.sites.rets, f"fl_ret_{f.fid}")
            if f.sites.ret_nops:
                self._prog.attach(f"retn:{f.fid}", f.sites.ret_nops, f"fl_retnop_{f.fid}")
            f.rets_on, f.rets_since = True, time.monotonic()
        if not f.entry_on:
            self._entry_on(f, now)
        self._prog.set_ctl(f.fid, f.epoch, True)
        f.timing, f.timing_since = True, time.monotonic()

    def _timing_off(self, f: _FuncState, now: float) -> None:
        """End a timing slice at once (a map write); the entry probe goes too unless it
        keeps counting. RETs stay until the calls timed in the slice have returned."""
        assert self._prog is not None
        self._prog.set_ctl(f.fid, f.epoch, False)
        f.timing = False
        if not f.count_always:
            self._entry_off(f, now)

    def _entry_on(self, f: _FuncState, now: float) -> None:
        assert self._prog is not None
        self._prog.attach(f"entry:{f.fid}", [f.sites.entry], f"fl_entry_{f.fid}")
        f.entry_on, f.entry_since = True, now

    def _entry_off(self, f: _FuncState, now: float) -> None:
        assert self._prog is not None
        self._prog.detach(f"entry:{f.fid}")
        f.counted_s += max(0.0, now - max(f.entry_since, self._last_read))
        f.entry_on, f.entry_gap = False, True

    def _rets_off(self, f: _FuncState) -> None:
        assert self._prog is not None
        self._prog.detach(f"rets:{f.fid}")
        self._prog.detach(f"retn:{f.fid}")
        f.rets_on = False
        f.rets_s += max(0.0, time.monotonic() - max(f.rets_since, self._last_read))

    # --- cost --------------------------------------------------------------------------

    def _entry_ns(self, f: _FuncState, entry_hits: int) -> float:
        b = self.budget
        return entry_hits * (b.emulated_ns if f.sites.entry.emulated else b.stepped_ns)

    def _ret_ns(self, ret_hits: int, nop_hits: int) -> float:
        """RETs are single-stepped, their NOP stand-ins emulated."""
        return ret_hits * self.budget.stepped_ns + nop_hits * self.budget.emulated_ns

    def _cost_ns(self, f: _FuncState, entry_hits: int, ret_hits: int, nop_hits: int) -> float:
        """What the hits cost the process."""
        return self._entry_ns(f, entry_hits) + self._ret_ns(ret_hits, nop_hits)

    def _delta(self, f: _FuncState, st: dict[str, int]) -> dict[str, int]:
        assert f.last is not None
        keys = ("entry_hits", "ret_hits", "ret_nop_hits", "opened", "overflow")
        d = {k: st[k] - f.last.stats[k] for k in keys}
        # Entries while timing was on. When the entry probe is attached only to time,
        # these are what the slice cost: it goes on counting until its detach is done
        # (tens of ms later), a tail that is not the slice's length.
        d["timed_entries"] = d["opened"] + d["overflow"]
        return d

    def _timing_spent(self, f: _FuncState, st: dict[str, int]) -> float:
        """What timing cost since the last read: the RETs, and the entries too when the
        entry probe is attached only to time."""
        d = self._delta(f, st)
        spent = self._ret_ns(d["ret_hits"], d["ret_nop_hits"])
        return spent if f.count_always else spent + self._entry_ns(f, d["timed_entries"])

    def _need(self, f: _FuncState, interval_s: float) -> float:
        """What watching the function all the time would cost over an interval (ns)."""
        if f.rate is None:
            return float("inf")
        entry = (f.entry_rate or 0.0) if f.count_always else f.timed_entry_rate
        return (f.rate + entry) * interval_s

    def _shares(self, interval_s: float) -> dict[int, float]:
        """Each function's allowance (ns) this interval: the budget left after the
        goexit1 probe, water-filled so cheap functions keep everything they need and
        the rest is split evenly among the hot ones."""
        allowance = self.budget.cpu_fraction * interval_s * 1e9
        if self._exit_rate is not None and self._prog is not None and self.cleanup_at_exit:
            allowance -= self._exit_rate * interval_s
        allowance = max(0.0, allowance)
        need = {f.fid: self._need(f, interval_s) for f in self.funcs}
        shares: dict[int, float] = {}
        left = sorted(self.funcs, key=lambda f: need[f.fid])
        while left:
            fair = allowance / len(left)
            f = left.pop(0)
            shares[f.fid] = min(need[f.fid], fair)
            allowance -= shares[f.fid]
        return shares

    # --- one interval ----------------------------------------------------------------

    def run_interval(self, interval_s: float) -> IntervalReading:
        """Watch for `interval_s` seconds and return what happened in them. Every call
        is counted while the entry probe's own cost fits the function's share; timing
        stays on throughout when its cost fits too, else it runs for a slice of the
        interval, cut when the share is spent."""
        prog = self._prog
        if prog is None:
            raise FuncProbeError("run_interval() before attach()")
        t0 = time.monotonic()
        end = t0 + interval_s
        shares = self._shares(interval_s)
        timed = {f.fid: 0.0 for f in self.funcs}
        sampled: set[int] = set()  # timing off for part of the interval
        slices: dict[int, float] = {}  # sampled fid -> length of its timing slice (s)
        timing_share: dict[int, float] = {}
        for f in self.funcs:
            share = shares[f.fid]
            entry_need = (f.entry_rate or 0.0) * interval_s
            count_always = f.sites.entry.emulated and share > 0 and entry_need <= share * 1.0001
            if f.count_always and not count_always and f.entry_on and not f.timing:
                self._entry_off(f, t0)
            f.count_always = count_always
            ts = max(0.0, share - entry_need) if count_always else share
            timing_share[f.fid] = ts
            if f.rate is None:
                slices[f.fid] = math.inf  # cost unknown: cut once the share is spent
            elif (f.rate + f.timed_entry_rate) * interval_s > ts * 1.0001:
                # A slice of S s costs (S + drain) s of RETs plus S s of timed entries.
                per_s = f.rate + f.timed_entry_rate
                s_len = (ts - f.drain_s * f.rate) / per_s if per_s > 0 else interval_s
                # Not even the drain fits: slice as if there were none (a little over).
                slices[f.fid] = s_len if s_len > 0 else ts / per_s
        started: dict[int, float] = {}
        want_on: list[_FuncState] = []
        start_at: dict[int, float] = {}
        for f in self.funcs:
            if f.timing:
                started[f.fid] = t0
                f.baseline_inflight = _inflight(prog.stats(f.fid))
            elif slices.get(f.fid, 1.0) > 0:
                want_on.append(f)
                # A slice starts at a random point of the interval, not at its start:
                # the start is when this process reads maps and (re)attaches probes,
                # and calls timed only then would carry that disturbance.
                # It ends early enough for its calls to return inside the interval
                # too, so each interval's timed calls are its own (weights are per
                # interval).
                room = interval_s - slices.get(f.fid, math.inf) - 1.5 * f.drain_s
                start_at[f.fid] = t0 + (self._rng.uniform(0, room) if room > 0 else 0.0)
            elif f.count_always and not f.entry_on and not prog.busy(f"entry:{f.fid}"):
                self._entry_on(f, t0)  # counting, no timing slice this interval
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for f in list(want_on):  # a slice starts once its old probes are gone
                if now >= start_at[f.fid] and not any(
                    prog.busy(f"{g}:{f.fid}") for g in ("entry", "rets", "retn")
                ):
                    self._timing_on(f, now)
                    started[f.fid] = now
                    want_on.remove(f)
            active = [f for f in self.funcs if f.fid in slices and (f.timing or f.rets_on)]
            if not active and not want_on:
                time.sleep(end - now)
                continue
            waiting = any(start_at[f.fid] <= now for f in want_on)  # for a detach
            wake = [end, now + POLL_S] if active or waiting else [end]
            wake += [started[f.fid] + slices[f.fid] for f in active if f.timing]
            wake += [start_at[f.fid] for f in want_on if start_at[f.fid] > now]
            time.sleep(max(0.0, min(wake) - now))
            now = time.monotonic()
            for f in active:
                st = prog.stats(f.fid)
                spent = self._timing_spent(f, st)
                if f.timing:
                    if now >= started[f.fid] + slices[f.fid] or spent >= timing_share[f.fid]:
                        timed[f.fid] += now - max(f.timing_since, t0)
                        self._timing_off(f, now)
                        sampled.add(f.fid)
                elif _inflight(st) <= f.baseline_inflight or spent >= 2 * timing_share[f.fid]:
                    self._rets_off(f)
        now = time.monotonic()
        sampled.update(f.fid for f in want_on)  # never got its slice this time
        for f in self.funcs:
            if f.timing:
                timed[f.fid] += now - max(f.timing_since, t0)
            d = self._delta(f, prog.stats(f.fid))
            counted = f.counted_s + (now - max(f.entry_since, t0) if f.entry_on else 0.0)
            if counted > 0:
                f.entry_rate = self._entry_ns(f, d["entry_hits"]) / counted
            rets_s = f.rets_s + (now - max(f.rets_since, t0) if f.rets_on else 0.0)
            if rets_s > 0 and timed[f.fid] > 0:
                # RETs see every call while attached, timed or not: their cost is per
                # second attached, which includes the drain after each slice.
                f.rate = self._ret_ns(d["ret_hits"], d["ret_nop_hits"]) / rets_s
                f.drain_s = max(0.0, rets_s - timed[f.fid]) if f.fid in slices else 0.0
                f.timed_entry_rate = (
                    0.0 if f.count_always else self._entry_ns(f, d["timed_entries"]) / timed[f.fid]
                )
        readings, delta = self._collect(t0, now, timed, sampled)
        elapsed = now - t0
        exit_ns = delta["exit_hits"] * (
            self.budget.emulated_ns if self.exit_site.emulated else self.budget.stepped_ns
        )
        self._exit_rate = exit_ns / elapsed if elapsed > 0 else None
        funcs_ns = sum(
            self._cost_ns(f, r.entry_hits, r.ret_hits, r.ret_nop_hits)
            for f, r in zip(self.funcs, readings, strict=True)
        )
        cost = (funcs_ns + exit_ns) / (elapsed * 1e9) if elapsed > 0 else 0.0
        self.budget.last_fraction = cost
        if self.cleanup_at_exit and exit_ns > self.budget.cpu_fraction * elapsed * 1e9 / 2:
            # Goroutine churn alone would eat the budget: stale calls age out of the LRU.
            prog.detach("goexit")
            self.cleanup_at_exit = False
        # Sampled functions start their next slice in the next interval; those whose
        # measured cost now fits stay timed through the boundary. RETs still waiting
        # for the calls of a late slice stay attached: the next interval takes them off
        # once those calls returned (long calls are not cut at the boundary).
        nxt = self._shares(interval_s)
        for f in self.funcs:
            if f.fid not in slices:
                continue
            if self._need(f, interval_s) <= nxt[f.fid] * 1.0001:
                continue
            if f.timing:
                self._timing_off(f, now)
            if f.rets_on and _inflight(prog.stats(f.fid)) <= f.baseline_inflight:
                self._rets_off(f)
        return IntervalReading(t0, now, readings, delta, cost, self.cleanup_at_exit)

    def flush(self) -> IntervalReading:
        """What happened since the last interval, read at once, nothing rescheduled:
        the final reading when stopping between intervals."""
        if self._prog is None:
            raise FuncProbeError("flush() before attach()")
        now = time.monotonic()
        t0 = min(self._last_read, now)
        timed = {f.fid: now - max(f.timing_since, t0) if f.timing else 0.0 for f in self.funcs}
        readings, delta = self._collect(t0, now, timed, set())
        return IntervalReading(t0, now, readings, delta, 0.0, self.cleanup_at_exit)

    def _collect(
        self, t0: float, now: float, timed: dict[int, float], sampled: set[int]
    ) -> tuple[list[FunctionLatency], dict[str, int]]:
        """Each function's figures since the last read, and the counters' deltas."""
        assert self._prog is not None
        readings = []
        for f in self.funcs:
            raw = self._prog.raw(f.fid)
            assert f.last is not None
            d = {k: raw.stats[k] - f.last.stats[k] for k in STAT_FIELDS}
            r = FunctionLatency(
                f.sites.symbol,
                raw.hist.minus(f.last.hist),
                window_s=now - t0,
                attached_s=timed[f.fid],
                entry_hits=d["entry_hits"],
                ret_hits=d["ret_hits"],
                ret_nop_hits=d["ret_nop_hits"],
                unmatched=d["unmatched"],
                stale=d["stale"],
                migrated=d["migrated"],
                overflow=d["overflow"],
                cut=d["expired"],
                sampled=f.fid in sampled,
            )
            if f.entry_on and not f.entry_gap:
                r.exact_calls = d["entry_hits"]
            else:
                # The entry probe was off for a while: scale up the calls entered while
                # timing was on. Timing switches at once (a map write) where attaching
                # and detaching the entry probe take tens of ms, so its time is known.
                r.sampled_hits = d["opened"] + d["overflow"]
                r.sampled_window_s = now - t0
                r.sampled_counted_s = timed[f.fid]
                if r.sampled_counted_s > 0:
                    rate = r.sampled_hits / r.sampled_counted_s
                    r.rate_n, r.rate_sum, r.rate_sq = 1, rate, rate * rate
            if r.sampled and r.timed:
                w = max(1.0, r.calls / r.timed)
                r.weighted = [c * w for c in r.hist.counts]
            f.counted_s, f.entry_gap, f.rets_s = 0.0, not f.entry_on, 0.0
            readings.append(r)
            f.last = raw
        counters = self._prog.counters()
        delta = {k: counters[k] - self._last_counters[k] for k in COUNTER_NAMES}
        self._last_counters = counters
        self._last_read = now
        return readings, delta

    # --- inspection ------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Kernel counters since attach (goroutine table churn, goexit1, read faults)."""
        return self._prog.counters() if self._prog is not None else {}

    def evicted(self) -> int:
        """Goroutines whose calls in flight the full LRU table dropped (their RETs then
        count as unmatched). Walks the table: not for every interval."""
        c = self.counters()
        return max(0, c["inflight_new"] - c["inflight_del"] - self.inflight_goroutines())

    def inflight_goroutines(self) -> int:
        """Goroutines with traced calls in flight, as the kernel table holds them now
        (walks the table: not for every interval)."""
        if self._prog is None:
            return 0
        return sum(1 for _ in self._prog.bpf["fl_inflight"])


def _inflight(st: dict[str, int]) -> int:
    return st["opened"] - st["count"] - st["stale"] - st["expired"]


# --- panics --------------------------------------------------------------------------


@dataclass(frozen=True)
class PanicSite:
    function: str  # the first function outside the runtime: the one that panicked
    file: str | None
    line: int | None
    count: int
    frames: tuple[str, ...]  # caller of gopanic first (runtime frames included)


@dataclass
class PanicReading:
    total: int
    sites: list[PanicSite]

    def by_function(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.function] = out.get(s.function, 0) + s.count
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "functions": [
                {"function": fn, "count": n}
                for fn, n in sorted(self.by_function().items(), key=lambda kv: -kv[1])
            ],
            "sites": [
                {
                    "function": s.function,
                    "file": s.file,
                    "line": s.line,
                    "count": s.count,
                    "frames": list(s.frames),
                }
                for s in sorted(self.sites, key=lambda s: -s.count)
            ],
        }


class PanicProbes:
    """Panics in one process, recovered or not: a uprobe on runtime.gopanic."""

    def __init__(self, proc: GoProcess, *, max_sites: int = DEFAULT_MAX_PANIC_SITES) -> None:
        self.proc = proc
        self.max_sites = max_sites
        self.site, self.sp_adj = runtime_site(proc, "runtime.gopanic", ("r14",))
        self._prog: LatencyProgram | None = None

    def attach(self) -> None:
        if self._prog is not None:
            return
        self._prog = LatencyProgram(
            self.proc,
            [],
            max_goroutines=1,
            max_panic_sites=self.max_sites,
            panic_sp_adj=self.sp_adj,
        )
        try:
            self._prog.attach("panic", [self.site], "fl_panic")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._prog is not None:
            self._prog.close()
            self._prog = None

    def __enter__(self) -> PanicProbes:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self) -> PanicReading:
        """Counts since attach."""
        if self._prog is None:
            raise FuncProbeError("read() before attach()")
        tab = self.proc.pclntab
        bias = self.proc.load_bias
        sites: list[PanicSite] = []
        for k, v in self._prog.bpf["fl_panics"].items():
            pcs: list[int] = []
            for pc in k.pcs:
                # Where gopanic's probe sits past its frame set-up (Go 1.19), the
                # frame-pointer walk repeats the caller: keep each frame once.
                if pc and (not pcs or pcs[-1] != pc - bias):
                    pcs.append(int(pc) - bias)
            names = []
            for pc in pcs:
                fn = tab.func_for_pc(pc - 1)
                names.append(fn.name if fn is not None else f"{pc:#x}")
            pick = next((i for i, n in enumerate(names) if not n.startswith("runtime.")), 0)
            src = tab.call_site(pcs[pick]) if pcs else None
            sites.append(
                PanicSite(
                    function=names[pick] if names else "?",
                    file=src.file if src else None,
                    line=src.line if src else None,
                    count=int(v.value),
                    frames=tuple(names),
                )
            )
        total = self._prog.counters()["panic_hits"]
        return PanicReading(total, _merge_sites(sites))


def _merge_sites(sites: list[PanicSite]) -> list[PanicSite]:
    """Sites recorded with different deeper frames but the same panicking line are one."""
    merged: dict[tuple[str, str | None, int | None], PanicSite] = {}
    for s in sites:
        key = (s.function, s.file, s.line)
        old = merged.get(key)
        merged[key] = s if old is None else PanicSite(*key, old.count + s.count, old.frames)
    return list(merged.values())
