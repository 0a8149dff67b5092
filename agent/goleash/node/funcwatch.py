"""Function latency and panics of one followed process, for the agent.

`FuncLatencyProbes.run_interval()` watches for a whole interval (it duty-cycles hot
functions inside it), so each process gets a worker thread running intervals back to
back; the agent's snapshot takes whatever accumulated since the previous one. BPF
programs are compiled and attached on the caller's thread (the agent's main loop),
never concurrently.

The agent's --func patterns apply to every followed process; a pattern that matches
nothing in one binary is skipped there (and said once), not an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from goleash.errors import GoleashError
from goleash.node.export import LatencyDelta
from goleash.probes import hist
from goleash.probes.budget import OverheadBudget
from goleash.probes.funclat import FuncLatencyProbes
from goleash.probes.funcrecord import FunctionLatency
from goleash.probes.funcs import FunctionIndex, Resolution, TracedFunction, resolve
from goleash.probes.panics import PanicProbes
from goleash.probes.target import GoProcess

log = logging.getLogger("goleash.agent")


@dataclass
class FuncTotals:
    """Since attach, per function: for Prometheus (cumulative histograms).

    `count` is every call. When timing was sampled, each interval's timed calls stand
    for all of that interval's calls: their buckets and sum are weighted by
    calls / timed, so the buckets estimate the distribution of all calls and the +Inf
    bucket equals the count. `timed` is how many calls were really timed."""

    buckets: list[float] = field(default_factory=lambda: [0.0] * hist.N_BUCKETS)
    count: float = 0.0
    sum_ns: float = 0.0
    timed: int = 0

    def add(self, r: FunctionLatency) -> None:
        calls = r.calls
        self.count += calls
        self.timed += r.timed
        if r.timed:
            w = calls / r.timed if calls >= r.timed else 1.0
            for i, c in enumerate(r.hist.counts):
                if c:
                    self.buckets[i] += c * w
            self.sum_ns += r.hist.sum_ns * w


def resolve_each(
    proc: GoProcess, patterns: Sequence[str]
) -> tuple[list[TracedFunction], list[Resolution], list[str]]:
    """Resolve patterns one by one: (functions, resolutions, why each failed one failed)."""
    index = FunctionIndex(proc.binary, proc.pclntab, proc.symbols)
    funcs: list[TracedFunction] = []
    resolutions: list[Resolution] = []
    missing: list[str] = []
    seen: set[str] = set()
    for p in patterns:
        try:
            sel = resolve(index, [p])
        except GoleashError as exc:
            missing.append(str(exc))
            continue
        resolutions.extend(sel.resolutions)
        for f in sel.functions:
            if f.symbol not in seen:
                seen.add(f.symbol)
                funcs.append(f)
    return funcs, resolutions, missing


class FunctionWatch:
    """Latency of the functions the patterns select in one process, plus its panics."""

    def __init__(
        self,
        proc: GoProcess,
        patterns: Sequence[str],
        *,
        interval: float,
        budget_fraction: float,
        panics: bool = True,
    ) -> None:
        self.proc = proc
        self.interval = interval
        self.functions, self.resolutions, self.missing = resolve_each(proc, patterns)
        budget = OverheadBudget(cpu_fraction=budget_fraction)
        self.latency = (
            FuncLatencyProbes(proc, self.functions, budget=budget) if self.functions else None
        )
        self.panic_probes = PanicProbes(proc) if panics else None
        self._lock = threading.Lock()
        self._pending: dict[str, FunctionLatency] = {}
        self.totals: dict[str, FuncTotals] = {}
        self._panics_seen: dict[str, int] = {}
        self.panic_totals: dict[str, int] = {}
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Compile and attach (on this thread); then time intervals on a worker."""
        try:
            if self.panic_probes is not None:
                self.panic_probes.attach()
            if self.latency is not None:
                self.latency.attach()
        except BaseException:
            self.close()
            raise
        if self.latency is not None:
            self._thread = threading.Thread(
                target=self._run, name=f"funclat-{self.proc.pid}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        assert self.latency is not None
        while not self._stop.is_set():
            try:
                reading = self.latency.run_interval(self.interval)
            except Exception as exc:  # the process exited under us, most often
                if self.proc.alive():
                    self.error = str(exc)
                    log.warning("function latency of PID %d stopped: %s", self.proc.pid, exc)
                return
            with self._lock:
                for r in reading.functions:
                    old = self._pending.get(r.symbol)
                    self._pending[r.symbol] = r if old is None else old + r
                    self.totals.setdefault(r.symbol, FuncTotals()).add(r)

    def totals_copy(self) -> dict[str, FuncTotals]:
        with self._lock:
            return {
                fn: FuncTotals(list(t.buckets), t.count, t.sum_ns, t.timed)
                for fn, t in self.totals.items()
            }

    def take(self) -> tuple[list[LatencyDelta], dict[str, int], dict[str, int]]:
        """Since the previous take: latency per function, panics per function, and
        calls seen but not timed (drop reasons)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        deltas = []
        not_timed = {"latency_calls_never_returned": 0, "latency_nest_overflow": 0}
        for f in pending.values():
            not_timed["latency_calls_never_returned"] += f.stale
            not_timed["latency_nest_overflow"] += f.overflow
            if f.timed or f.calls:
                buckets = {i: c for i, c in enumerate(f.hist.counts) if c}
                err = f.calls_error
                deltas.append(
                    LatencyDelta(
                        f.symbol,
                        hist.SUB_BITS,
                        buckets,
                        f.timed,
                        f.hist.sum_ns,
                        # Not counted at all (the entry probe never got a slice):
                        # unknown, which the API says by leaving `calls` out.
                        calls=f.calls if err is not None else None,
                        calls_error=err or 0.0,
                    )
                )
        panics: dict[str, int] = {}
        if self.panic_probes is not None:
            try:
                now = self.panic_probes.read().by_function()
            except Exception:  # maps are gone once closed; nothing new to count
                now = self._panics_seen
            for fn, n in now.items():
                d = n - self._panics_seen.get(fn, 0)
                if d > 0:
                    panics[fn] = d
            self._panics_seen = dict(now)
            self.panic_totals = dict(now)
        return deltas, panics, {k: v for k, v in not_timed.items() if v}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.latency is not None:
            self.latency.close()
        if self.panic_probes is not None:
            self.panic_probes.close()
