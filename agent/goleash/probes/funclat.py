"""Function latency in one process: read the kernel's histograms as per-interval
deltas and keep the probes' cost under the process's overhead budget (the sampling
scheduler). Its parts: funcsites.py (where the probes go), funcprog.py (the compiled
bpf/funclat.bpf.c and its maps), funcrecord.py (what a reading holds); panics.py
counts panics with the same program.

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

import math
import random
import time
from collections.abc import Sequence

from goleash.probes.budget import OverheadBudget
from goleash.probes.funcprog import (
    COUNTER_NAMES,
    STAT_FIELDS,
    LatencyProgram,
)
from goleash.probes.funcrecord import FunctionLatency, IntervalReading
from goleash.probes.funcs import TracedFunction
from goleash.probes.funcsites import FuncProbeError, function_sites, runtime_site
from goleash.probes.funcstate import FuncState, Interval, calls_inflight, kernel_ns, window_opened
from goleash.probes.target import GoProcess

DEFAULT_MAX_GOROUTINES = 16384
POLL_S = 0.05  # how often a sampled function's slice is checked against its share
# How soon the calls of an ended slice are first checked for having returned: RETs
# left on are the dearest probes there are, and a 50 ms poll kept them on 50 ms past
# calls of a few ms, which took ~40% of a hot function's timing share. The check (one
# map read) backs off to POLL_S as the drain goes on, for calls that take long.
DRAIN_POLL_S = 0.005
DEBT_INTERVALS = 2.0  # a function's debt is capped at this many of its shares
# A sampling slice's timing window opens this long after the map write that opens it,
# so the write has landed by then and the kernel times entries over exactly the window
# user space divides by (a busy host preempts the writer for ms; slices last a few ms).
WINDOW_LEAD_S = 0.001


class FuncLatencyProbes:
    """Latency of chosen functions in one process: `attach()`, then `run_interval(s)`
    repeatedly (each returns that interval's figures), then `close()`."""

    def __init__(
        self,
        proc: GoProcess,
        functions: Sequence[TracedFunction],
        *,
        budget: OverheadBudget | None = None,
        cleanup_at_exit: bool | None = None,
        max_goroutines: int = DEFAULT_MAX_GOROUTINES,
    ) -> None:
        self.proc = proc
        self.budget = budget if budget is not None else OverheadBudget()
        if not self.budget.cpu_fraction > 0:
            raise FuncProbeError(
                "a budget of 0 allows the probes no cost at all: nothing can be counted or "
                "timed (give a share of a core, or no limit)"
            )
        self.funcs = [FuncState(function_sites(proc, fn), i) for i, fn in enumerate(functions)]
        self.exit_site, _ = runtime_site(proc, "runtime.goexit1", ("r14",))
        # The goexit1 probe costs a hit per goroutine exit, whatever the traced
        # functions: a service starting 5 goroutines per request paid twice as many
        # hits there as at ReadFrame's entry. It only drops calls that never return
        # (runtime.Goexit inside one), which are rare: under a budget they age out of
        # the LRU table instead (a recovered panic is handled at the next entry or
        # return of the goroutine, by depth). With no limit it is attached.
        self.cleanup_at_exit = (
            not math.isfinite(self.budget.cpu_fraction)
            if cleanup_at_exit is None
            else cleanup_at_exit
        )
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
        # Timing starts at attach and is first judged in run_interval(): a measurement
        # of the host's hit cost then would leave every call of it timed, unbudgeted.
        self.budget.hit_costs()
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
                f.read_at = time.monotonic()
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

    def _timing_on(self, f: FuncState, now: float, length_s: float = math.inf) -> None:
        """Start a timing slice of `length_s`, which the kernel ends on its own clock:
        RET probes first, so no timed entry lacks its RET."""
        assert self._prog is not None
        st = self._prog.stats(f.fid)
        f.baseline_inflight = calls_inflight(st)
        if not f.rets_on:
            # A new epoch: frames entered before may have returned while RETs were off.
            f.epoch += 1
            self._prog.set_ctl(f.fid, f.epoch, False)
            if f.sites.rets:
                self._prog.attach(f"rets:{f.fid}", f.sites.rets, "fl_ret")
            if f.sites.ret_nops:
                self._prog.attach(f"retn:{f.fid}", f.sites.ret_nops, "fl_retnop")
            f.rets_on, f.rets_since = True, time.monotonic()
        if not f.entry_on:
            self._entry_on(f, now)
        before = time.monotonic()
        if math.isinf(length_s):
            # Timed from now on (attach, or a function whose cost fits): its calls are
            # counted exactly, and the first calls after attach must be timed.
            f.timing, f.window_until = True, math.inf
            f.timing_since = (before + self._write_window(f, 0.0)) / 2
            return
        start = before + WINDOW_LEAD_S
        f.timing, f.window_until = True, start + length_s
        f.timing_since = window_opened(start, self._write_window(f, start))

    def _write_window(self, f: FuncState, start: float) -> float:
        """Time entries from `start` until f.window_until on the kernel's clock; returns
        when the write had surely landed."""
        assert self._prog is not None
        self._prog.set_ctl(f.fid, f.epoch, True, kernel_ns(start), kernel_ns(f.window_until))
        return time.monotonic()

    def _close_window(self, f: FuncState, end: float) -> None:
        f.windows.append((f.timing_since, max(f.timing_since, min(end, f.window_until))))

    def _reopen_window(self, f: FuncState) -> None:
        """Timing goes on past the planned end of its slice (its cost fits now): the
        window loses its end when the write lands (the kernel may have closed it
        before; then it opens again there)."""
        before = time.monotonic()
        planned, f.window_until = f.window_until, math.inf
        landed = self._write_window(f, 0.0)
        mid = (before + landed) / 2
        f.windows.append((f.timing_since, max(f.timing_since, min(mid, planned))))
        f.timing_since = mid

    def _timed_s(self, f: FuncState, lo: float, hi: float) -> float:
        """How long the kernel timed the function's entries within [lo, hi]."""
        spans = [*f.windows, (f.timing_since, f.window_until)] if f.timing else f.windows
        return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans)

    def _timing_off(self, f: FuncState, now: float) -> None:
        """End a timing slice at once (a map write); the entry probe goes too unless it
        keeps counting. RETs stay until the calls timed in the slice have returned."""
        assert self._prog is not None
        before = time.monotonic()
        self._prog.set_ctl(f.fid, f.epoch, False)
        # The kernel stopped timing when the write landed, or at the window's planned
        # end if that came first (user space woke late).
        self._close_window(f, (before + time.monotonic()) / 2)
        f.timing, f.timing_until = False, now
        if not f.count_always:
            self._entry_off(f, now)

    def _entry_on(self, f: FuncState, now: float) -> None:
        assert self._prog is not None
        self._prog.attach(f"entry:{f.fid}", [f.sites.entry], "fl_entry")
        f.entry_on, f.entry_since = True, now

    def _entry_off(self, f: FuncState, now: float) -> None:
        assert self._prog is not None
        self._prog.detach(f"entry:{f.fid}")
        f.counted_s += max(0.0, now - max(f.entry_since, self._last_read))
        f.entry_on, f.entry_gap = False, True

    def _rets_off(self, f: FuncState) -> None:
        assert self._prog is not None
        self._prog.detach(f"rets:{f.fid}")
        self._prog.detach(f"retn:{f.fid}")
        f.rets_on = False
        f.rets_s += max(0.0, time.monotonic() - max(f.rets_since, self._last_read))

    # --- cost --------------------------------------------------------------------------

    def _entry_ns(self, f: FuncState, entry_hits: int) -> float:
        b = self.budget
        return entry_hits * (b.emulated_ns if f.sites.entry.emulated else b.stepped_ns)

    def _ret_ns(self, ret_hits: int, nop_hits: int) -> float:
        """RETs are single-stepped, their NOP stand-ins emulated."""
        return ret_hits * self.budget.stepped_ns + nop_hits * self.budget.emulated_ns

    def _cost_ns(self, f: FuncState, entry_hits: int, ret_hits: int, nop_hits: int) -> float:
        """What the hits cost the process."""
        return self._entry_ns(f, entry_hits) + self._ret_ns(ret_hits, nop_hits)

    def _delta(self, f: FuncState, st: dict[str, int]) -> dict[str, int]:
        assert f.last is not None
        keys = ("entry_hits", "ret_hits", "ret_nop_hits", "opened", "overflow")
        d = {k: st[k] - f.last.stats[k] for k in keys}
        # Entries while timing was on. When the entry probe is attached only to time,
        # these are what the slice cost: it goes on counting until its detach is done
        # (tens of ms later), a tail that is not the slice's length.
        d["timed_entries"] = d["opened"] + d["overflow"]
        return d

    def _timing_spent(self, f: FuncState, st: dict[str, int]) -> float:
        """What timing cost since the last read: the RETs, and the entries too when the
        entry probe is attached only to time."""
        d = self._delta(f, st)
        spent = self._ret_ns(d["ret_hits"], d["ret_nop_hits"])
        return spent if f.count_always else spent + self._entry_ns(f, d["timed_entries"])

    def _timing_left(self, f: FuncState, iv: Interval, st: dict[str, int], now: float) -> float:
        """What timing may still cost this interval: its planned share, less what
        counting is on course to cost beyond the plan. The plan set counting aside at
        the last interval's rate (nothing in the first, where it is unknown); a
        rising call rate would otherwise spill over the budget."""
        planned = iv.timing_share[f.fid]
        if not f.count_always:
            return planned
        elapsed = now - iv.t0
        if elapsed < POLL_S:
            return planned  # too short a stretch to project from
        counted = self._entry_ns(f, self._delta(f, st)["entry_hits"])
        projected = counted * iv.length_s / elapsed
        return min(planned, iv.shares[f.fid] - projected)

    def _need(self, f: FuncState, interval_s: float) -> float:
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
        iv = Interval(t0, t0 + interval_s, interval_s, {f.fid: 0.0 for f in self.funcs})
        self._plan_slices(iv, self._shares(interval_s))
        self._place_slices(prog, iv)
        self._run_slices(prog, iv)
        now = time.monotonic()
        iv.sampled.update(f.fid for f in iv.want_on)  # never got its slice this time
        self._measure_rates(prog, iv, now)
        readings, delta = self._collect(t0, now, iv.timed, iv.sampled)
        cost = self._account(prog, readings, delta, now - t0)
        self._settle(iv, readings, now - t0)
        self._carry_over(prog, iv, now)
        return IntervalReading(t0, now, readings, delta, cost, self.cleanup_at_exit)

    def _plan_slices(self, iv: Interval, shares: dict[int, float]) -> None:
        """Per function: whether the entry probe keeps counting (its cost fits the
        share), what is left for timing, and the slice timing gets when that is not
        enough for the whole interval."""
        for f in self.funcs:
            share = shares[f.fid]
            entry_need = (f.entry_rate or 0.0) * iv.length_s
            count_always = f.sites.entry.emulated and share > 0 and entry_need <= share * 1.0001
            if f.count_always and not count_always and f.entry_on and not f.timing:
                self._entry_off(f, iv.t0)
            f.count_always = count_always
            undebted = max(0.0, share - entry_need) if count_always else share
            ts = max(0.0, undebted - f.debt_ns)
            iv.timing_share[f.fid] = ts
            iv.shares[f.fid] = share
            if f.rate is None:
                iv.slices[f.fid] = math.inf  # cost unknown: cut once the share is spent
            elif ts <= 0 and count_always:
                # Counting (or the debt) takes the whole share: no timing this interval.
                # (When counting is sampled too, a slice is what counts the calls: it
                # keeps its length below, debt or not.)
                iv.slices[f.fid] = 0.0
                iv.sampled.add(f.fid)
            elif (f.rate + f.timed_entry_rate) * iv.length_s > ts * 1.0001:
                # A slice of S s costs (S + drain) s of RETs plus S s of timed entries.
                per_s = f.rate + f.timed_entry_rate
                s_len = (ts - f.drain_s * f.rate) / per_s if per_s > 0 else iv.length_s
                # Not even the drain fits: slice as if there were none (a little over).
                fallback = ts if count_always else undebted
                iv.slices[f.fid] = s_len if s_len > 0 else fallback / per_s

    def _place_slices(self, prog: LatencyProgram, iv: Interval) -> None:
        """When each function's timing starts this interval (now, for those still
        timed from the last one)."""
        for f in self.funcs:
            if f.timing:
                iv.started[f.fid] = iv.t0
                f.baseline_inflight = calls_inflight(prog.stats(f.fid))
            elif iv.slices.get(f.fid, 1.0) > 0:
                iv.want_on.append(f)
                # A slice starts at a random point of the interval, not at its start:
                # the start is when this process reads maps and (re)attaches probes,
                # and calls timed only then would carry that disturbance.
                # It ends early enough for its calls to return inside the interval
                # too, so each interval's timed calls are its own (weights are per
                # interval).
                room = iv.length_s - iv.slices.get(f.fid, math.inf) - 1.5 * f.drain_s
                iv.start_at[f.fid] = iv.t0 + (self._rng.uniform(0, room) if room > 0 else 0.0)
            elif f.count_always and not f.entry_on and not prog.busy(f"entry:{f.fid}"):
                self._entry_on(f, iv.t0)  # counting, no timing slice this interval

    def _run_slices(self, prog: LatencyProgram, iv: Interval) -> None:
        """Until the interval ends: start slices when due, end them when their time or
        share is spent, and take RETs off once the calls of a slice have returned."""
        slices, started, want_on, start_at = iv.slices, iv.started, iv.want_on, iv.start_at
        while True:
            now = time.monotonic()
            if now >= iv.end:
                break
            for f in list(want_on):  # a slice starts once its old probes are gone
                if now >= start_at[f.fid] and not any(
                    prog.busy(f"{g}:{f.fid}") for g in ("entry", "rets", "retn")
                ):
                    self._timing_on(f, now, slices.get(f.fid, math.inf))
                    started[f.fid] = now
                    want_on.remove(f)
            active = [f for f in self.funcs if f.fid in slices and (f.timing or f.rets_on)]
            if not active and not want_on:
                time.sleep(iv.end - now)
                continue
            waiting = any(start_at[f.fid] <= now for f in want_on)  # for a detach
            wake = [iv.end, now + self._poll_s(active, now)] if active or waiting else [iv.end]
            wake += [started[f.fid] + slices[f.fid] for f in active if f.timing]
            wake += [start_at[f.fid] for f in want_on if start_at[f.fid] > now]
            time.sleep(max(0.0, min(wake) - now))
            now = time.monotonic()
            for f in active:
                st = prog.stats(f.fid)
                spent = self._timing_spent(f, st)
                if f.timing:
                    if now >= started[f.fid] + slices[f.fid] or spent >= self._timing_left(
                        f, iv, st, now
                    ):
                        self._timing_off(f, now)
                        iv.sampled.add(f.fid)
                elif (
                    calls_inflight(st) <= f.baseline_inflight or spent >= 2 * iv.timing_share[f.fid]
                ):
                    self._rets_off(f)

    @staticmethod
    def _poll_s(active: list[FuncState], now: float) -> float:
        """POLL_S, or sooner while a slice's calls drain: a quarter of the drain so
        far, from DRAIN_POLL_S (a drain overshoots its calls by at most ~25%)."""
        drains = [now - f.timing_until for f in active if f.rets_on and not f.timing]
        if not drains:
            return POLL_S
        return min(POLL_S, max(DRAIN_POLL_S, min(drains) / 4))

    def _measure_rates(self, prog: LatencyProgram, iv: Interval, now: float) -> None:
        """What each function's probes cost per second in this interval: the next
        interval's shares and slices are planned from it."""
        t0, timed = iv.t0, iv.timed
        for f in self.funcs:
            timed[f.fid] = self._timed_s(f, t0, now)
            d = self._delta(f, prog.stats(f.fid))
            counted = f.counted_s + (now - max(f.entry_since, t0) if f.entry_on else 0.0)
            if counted > 0:
                f.entry_rate = self._entry_ns(f, d["entry_hits"]) / counted
            rets_s = f.rets_s + (now - max(f.rets_since, t0) if f.rets_on else 0.0)
            if rets_s > 0 and timed[f.fid] > 0:
                # RETs see every call while attached, timed or not: their cost is per
                # second attached, which includes the drain after each slice. A slice
                # of a few ms may catch no call at all (a busy host did not run the
                # process then): counting one more call than it saw keeps that from
                # reading as a free function timed all the next interval, far over
                # its budget (a loaded host timed ~1,000 calls of ~6,000 that way).
                f.rate = self._ret_ns(d["ret_hits"] + 1, d["ret_nop_hits"]) / rets_s
                f.drain_s = max(0.0, rets_s - timed[f.fid]) if f.fid in iv.slices else 0.0
                f.timed_entry_rate = (
                    0.0
                    if f.count_always
                    else self._entry_ns(f, d["timed_entries"] + 1) / timed[f.fid]
                )

    def _account(
        self,
        prog: LatencyProgram,
        readings: list[FunctionLatency],
        delta: dict[str, int],
        elapsed: float,
    ) -> float:
        """What the probes cost the process over the interval (share of one core);
        the goexit1 probe goes when goroutine churn alone would eat the budget."""
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
        return cost

    def _settle(self, iv: Interval, readings: list[FunctionLatency], elapsed: float) -> None:
        """Carry what each function's probes cost beyond its share into its debt (at
        most DEBT_INTERVALS shares: one spike must not silence timing for long)."""
        scale = elapsed / iv.length_s if iv.length_s > 0 else 1.0
        for f, r in zip(self.funcs, readings, strict=True):
            share = iv.shares.get(f.fid, 0.0) * scale
            cost = self._cost_ns(f, r.entry_hits, r.ret_hits, r.ret_nop_hits)
            f.debt_ns = min(max(0.0, f.debt_ns + cost - share), DEBT_INTERVALS * share)

    def _carry_over(self, prog: LatencyProgram, iv: Interval, now: float) -> None:
        """Sampled functions start their next slice in the next interval; those whose
        measured cost now fits stay timed through the boundary. RETs still waiting
        for the calls of a late slice stay attached: the next interval takes them off
        once those calls returned (long calls are not cut at the boundary)."""
        nxt = self._shares(iv.length_s)
        for f in self.funcs:
            if f.fid not in iv.slices:
                continue
            if self._need(f, iv.length_s) <= nxt[f.fid] * 1.0001:
                if f.timing and math.isfinite(f.window_until):
                    self._reopen_window(f)
                continue
            if f.timing:
                self._timing_off(f, now)
            if f.rets_on and calls_inflight(prog.stats(f.fid)) <= f.baseline_inflight:
                self._rets_off(f)

    def flush(self) -> IntervalReading:
        """What happened since the last interval, read at once, nothing rescheduled:
        the final reading when stopping between intervals."""
        if self._prog is None:
            raise FuncProbeError("flush() before attach()")
        now = time.monotonic()
        t0 = min(self._last_read, now)
        timed = {f.fid: self._timed_s(f, t0, now) for f in self.funcs}
        readings, delta = self._collect(t0, now, timed, set())
        return IntervalReading(t0, now, readings, delta, 0.0, self.cleanup_at_exit)

    def _collect(
        self, t0: float, now: float, timed: dict[int, float], sampled: set[int]
    ) -> tuple[list[FunctionLatency], dict[str, int]]:
        """Each function's figures since the last read, and the counters' deltas."""
        assert self._prog is not None
        readings = []
        for f in self.funcs:
            read_at = time.monotonic()  # its entries counted up to here
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
                # timing was on. Attaching and detaching the entry probe take tens of
                # ms, but the kernel times entries over a window on its own clock, so
                # the time they were counted in is known: between the two map reads.
                r.sampled_hits = d["opened"] + d["overflow"]
                r.sampled_window_s = read_at - f.read_at
                r.sampled_counted_s = self._timed_s(f, f.read_at, read_at)
                if r.sampled_counted_s > 0:
                    rate = r.sampled_hits / r.sampled_counted_s
                    r.rate_n, r.rate_sum, r.rate_sq = 1, rate, rate * rate
            if r.sampled:
                r.weigh()
            f.counted_s, f.entry_gap, f.rets_s = 0.0, not f.entry_on, 0.0
            f.windows = [w for w in f.windows if w[1] > read_at]
            readings.append(r)
            f.last, f.read_at = raw, read_at
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
