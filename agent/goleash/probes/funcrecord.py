"""What function-latency probes report: one function over a window of time
(FunctionLatency, additive across windows) and one interval of the scheduler.

Plain data: no BCC, so node and bench code can merge and print readings anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from goleash.probes import hist
from goleash.probes.hist import Histogram

# Calls estimated from a sampled entry probe carry this many standard deviations of
# error (Poisson counts: ~95% of intervals land inside), see FunctionLatency.calls_error.
CALLS_ERROR_SIGMAS = 2.0
# A sampled interval's timed calls stand for all its calls (weight calls / timed), but
# never as if fewer than this many were timed: a slice that caught 2 calls would
# otherwise weigh as much as one that caught 200, and its 2 calls would move the
# quantiles (CI saw a p50 of 1.4 ms for calls whose p50 was 4.5 ms that way).
MIN_TIMED_WEIGHT = 32
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
    # quantiles (None: no interval was sampled, the plain counts). See weigh().
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

    def weigh(self) -> None:
        """Mark this reading as one sampled interval: its timed calls stand for all of
        its calls in the quantiles of a sum of readings (see MIN_TIMED_WEIGHT)."""
        self.sampled = True
        if self.timed:
            w = max(1.0, self.calls / max(self.timed, MIN_TIMED_WEIGHT))
            self.weighted = [c * w for c in self.hist.counts]

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
