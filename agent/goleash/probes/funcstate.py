"""What the sampling scheduler of probes/funclat.py keeps: per function (its probes'
state, timing windows, measured rates, debt) and per interval (the slices' plan),
and the small conversions between user space's clock and the kernel's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from goleash.probes.funcprog import NEVER_NS, RawReading
from goleash.probes.funcsites import FuncSites


@dataclass
class FuncState:
    sites: FuncSites
    fid: int
    entry_on: bool = False  # entry probe attached: every call is counted
    timing: bool = False  # the kernel times entries (fl_ctl.timing)
    rets_on: bool = False
    # The entry probe stays attached between timing slices (counting every call) when
    # it is emulated and its own cost fits the function's share.
    count_always: bool = True
    entry_since: float = 0.0  # when the entry probe was last attached
    timing_since: float = 0.0  # when timing was last switched on (its window opened)
    timing_until: float = 0.0  # ... and off: the calls of the slice drain since then
    # The kernel's timing windows (time.monotonic(), fl_ctl.from_ns/until_ns) not yet
    # wholly read: calls are estimated from the entries timed over exactly these.
    windows: list[tuple[float, float]] = field(default_factory=list)
    window_until: float = math.inf  # the open window's planned end (while timing)
    read_at: float = 0.0  # when its maps were last read
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
    # What its probes cost beyond its shares so far (ns): a first interval planned
    # without rates, a drain longer than the share left, a rising call rate. Timing
    # repays it in the next intervals, so the budget holds on average.
    debt_ns: float = 0.0
    last: RawReading | None = None


@dataclass
class Interval:
    """One run_interval's schedule and what it saw, shared by its steps."""

    t0: float  # time.monotonic() at its start
    end: float
    length_s: float
    timed: dict[int, float]  # fid -> seconds its calls were timed
    sampled: set[int] = field(default_factory=set)  # timing off for part of the interval
    slices: dict[int, float] = field(default_factory=dict)  # sampled fid -> slice length (s)
    timing_share: dict[int, float] = field(default_factory=dict)  # fid -> ns timing may cost
    shares: dict[int, float] = field(default_factory=dict)  # fid -> ns all its probes may cost
    started: dict[int, float] = field(default_factory=dict)  # fid -> when its slice started
    want_on: list[FuncState] = field(default_factory=list)  # waiting for their slice
    start_at: dict[int, float] = field(default_factory=dict)  # fid -> when it is due


def kernel_ns(t: float) -> int:
    """A time.monotonic() as the kernel's bpf_ktime_get_ns() (both CLOCK_MONOTONIC)."""
    return NEVER_NS if math.isinf(t) else round(t * 1e9)


def window_opened(start: float, landed: float) -> float:
    """When a window meant to open at `start` did: then, if its write had landed by
    then; else (preempted past the lead) somewhere in [start, landed]."""
    return start if landed <= start else (start + landed) / 2


def calls_inflight(st: dict[str, int]) -> int:
    return st["opened"] - st["count"] - st["stale"] - st["expired"]
