"""Log-linear latency histograms: the bucket layout the kernel fills and user space reads.

A value v (nanoseconds) below SUB lands in bucket v. Above, its octave k = floor(log2 v)
is split into SUB equal sub-buckets: bucket (k - SUB_BITS + 1) * SUB + the SUB_BITS bits
of v just below its top bit. A bucket is then at most 1/SUB of its lower bound wide, so
any value, and any quantile estimated inside its bucket, is within 1/SUB (6.25% with
SUB_BITS = 4) of the truth: the issue's "within 10%" holds from 1 ns to 2^MAX_EXP ns
(~18 minutes), far past the 1 µs .. 100 s it asks for. Values beyond go to the last bucket.

`bpf/funclat.bpf.c` computes the same index from the -D macros `c_defines()` returns,
so the two sides cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SUB_BITS = 4
SUB = 1 << SUB_BITS
MAX_EXP = 40  # octaves up to 2^40 ns (~18 min); longer calls clamp into the last bucket
N_BUCKETS = (MAX_EXP - SUB_BITS + 1) * SUB
SLOTS = 1 << (N_BUCKETS - 1).bit_length()  # the kernel's array, a power of two (masking)

QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)


def c_defines() -> dict[str, int]:
    """The layout as C macros for bpf/funclat.bpf.c."""
    return {
        "GL_FL_SUB_BITS": SUB_BITS,
        "GL_FL_SUB": SUB,
        "GL_FL_MAX_EXP": MAX_EXP,
        "GL_FL_NBUCKETS": N_BUCKETS,
        "GL_FL_SLOTS": SLOTS,
    }


def bucket_of(v: int) -> int:
    """Index of the bucket holding value v (the kernel's fl_bucket())."""
    if v < SUB:
        return max(v, 0)
    k = v.bit_length() - 1
    if k >= MAX_EXP:
        return N_BUCKETS - 1
    sub = (v >> (k - SUB_BITS)) - SUB
    return (k - SUB_BITS + 1) * SUB + sub


def bucket_bounds(i: int) -> tuple[int, int]:
    """[lo, hi) of bucket i in ns."""
    if i < SUB:
        return i, i + 1
    octave, sub = divmod(i, SUB)
    k = octave + SUB_BITS - 1
    width = 1 << (k - SUB_BITS)
    lo = (1 << k) + sub * width
    return lo, lo + width


@dataclass
class Histogram:
    """Counts per bucket, plus the exact count and sum the kernel keeps beside them."""

    counts: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    count: int = 0
    sum_ns: int = 0
    max_ns: int = 0  # 0 when unknown (an interval delta cannot subtract a max)

    @classmethod
    def of(cls, values: Iterable[int]) -> Histogram:
        h = cls()
        for v in values:
            h.counts[bucket_of(v)] += 1
            h.count += 1
            h.sum_ns += v
            h.max_ns = max(h.max_ns, v)
        return h

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            self.count + other.count,
            self.sum_ns + other.sum_ns,
            max(self.max_ns, other.max_ns),
        )

    def minus(self, earlier: Histogram) -> Histogram:
        """What was added since `earlier` (a snapshot of the same cumulative histogram).
        Max is kept from self only when it grew, since a max cannot be subtracted."""
        return Histogram(
            [a - b for a, b in zip(self.counts, earlier.counts, strict=True)],
            self.count - earlier.count,
            self.sum_ns - earlier.sum_ns,
            self.max_ns if self.max_ns > earlier.max_ns else 0,
        )

    @property
    def mean_ns(self) -> float:
        return self.sum_ns / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        return quantile(self.counts, q, self.max_ns)

    def quantiles(self, qs: Sequence[float] = QUANTILES) -> dict[float, float]:
        return {q: self.quantile(q) for q in qs}

    def log2_rows(self, unit_ns: int = 1000) -> list[tuple[int, int, int]]:
        """(lo, hi, count) per power-of-two range of `unit_ns` units (µs by default), from
        the first non-empty range to the last: what BCC's funclatency prints. A fine
        bucket goes to the range holding its midpoint."""
        per: dict[int, int] = {}
        for i, c in enumerate(self.counts):
            if c:
                lo, hi = bucket_bounds(i)
                units = int((lo + hi) / 2 / unit_ns)
                k = units.bit_length() - 1  # -1 for values below one unit
                per[k] = per.get(k, 0) + c
        if not per:
            return []
        rows = []
        for k in range(min(per), max(per) + 1):
            lo, hi = (0, 0) if k < 0 else (1 << k, (1 << (k + 1)) - 1)
            rows.append((lo, hi, per.get(k, 0)))
        return rows


def quantile(counts: Sequence[float], q: float, max_ns: int = 0) -> float:
    """The q-quantile (nearest rank) of the values behind `counts`, interpolated linearly
    inside its bucket; NaN when empty. Capped by max_ns when known."""
    total = sum(counts)
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(q * total))  # the rank-th smallest value
    seen = 0.0  # counts may be weighted (sampled timing), so not whole numbers
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo, hi = bucket_bounds(i)
            est = lo + (hi - lo) * (rank - seen - 0.5) / c
            return min(est, float(max_ns)) if max_ns else est
        seen += c
    raise AssertionError("unreachable: rank <= total")


def exact_quantile(values: Sequence[int], q: float) -> float:
    """Nearest-rank quantile of raw values (what a test compares the estimate with)."""
    if not values:
        return math.nan
    s = sorted(values)
    return float(s[max(1, math.ceil(q * len(s))) - 1])
