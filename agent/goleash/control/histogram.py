"""Log-linear latency histograms (the layout proto LogLinearHistogram describes).

Every power of two [2^e, 2^(e+1)) nanoseconds is split in 2^B equal sub-buckets, so a
bucket's width is at most 2^-B of its lower bound. Layouts with fewer sub-bucket
bits nest inside finer ones (every fine bucket lies inside one coarse bucket), which
makes merging histograms of different resolutions exact at the coarser one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_SUB_BUCKET_BITS = 8
NS = 1e-9


def bucket_index(value_ns: int, bits: int) -> int:
    """Index of the bucket holding `value_ns` (negative values count as 0)."""
    if value_ns < (1 << bits):
        return max(value_ns, 0)
    e = value_ns.bit_length() - 1
    return ((e - bits + 1) << bits) + (value_ns >> (e - bits)) - (1 << bits)


def bucket_bounds(index: int, bits: int) -> tuple[int, int]:
    """[low, high) nanoseconds of bucket `index`."""
    n = 1 << bits
    if index < n:
        return index, index + 1
    e = (index >> bits) + bits - 1
    low = (n + (index & (n - 1))) << (e - bits)
    return low, low + (1 << (e - bits))


@dataclass(slots=True)
class Histogram:
    """Bucket counts at one resolution, plus count and sum (seconds)."""

    bits: int
    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    sum_seconds: float = 0.0

    def coarsen(self, bits: int) -> None:
        """Re-bucket to fewer sub-bucket bits (exact: buckets nest)."""
        if bits >= self.bits:
            return
        merged: dict[int, int] = {}
        for idx, c in self.buckets.items():
            to = bucket_index(bucket_bounds(idx, self.bits)[0], bits)
            merged[to] = merged.get(to, 0) + c
        self.buckets, self.bits = merged, bits

    def add(
        self, bits: int, buckets: Iterable[tuple[int, int]], count: int, sum_seconds: float
    ) -> None:
        """Add observations given at resolution `bits` (coarsening self if needed)."""
        self.coarsen(bits)
        mine = self.buckets
        if bits == self.bits:
            for idx, c in buckets:
                mine[idx] = mine.get(idx, 0) + c
        else:
            for idx, c in buckets:
                to = bucket_index(bucket_bounds(idx, bits)[0], self.bits)
                mine[to] = mine.get(to, 0) + c
        self.count += count
        self.sum_seconds += sum_seconds

    def merge(self, other: Histogram) -> None:
        self.add(other.bits, other.buckets.items(), other.count, other.sum_seconds)

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Values (seconds) at quantiles `qs`, interpolated linearly inside buckets."""
        return quantiles(self.buckets, self.bits, qs)


def quantiles(buckets: Mapping[int, int], bits: int, qs: Sequence[float]) -> list[float]:
    total = sum(buckets.values())
    if total == 0:
        return [0.0 for _ in qs]
    ordered = sorted(buckets.items())
    out = []
    for q in qs:
        rank = q * total
        seen = 0
        for idx, c in ordered:
            if c and seen + c >= rank:
                low, high = bucket_bounds(idx, bits)
                out.append((low + (high - low) * (rank - seen) / c) * NS)
                break
            seen += c
        else:
            out.append(bucket_bounds(ordered[-1][0], bits)[1] * NS)
    return out


def from_values(values_ns: Iterable[int], bits: int) -> Histogram:
    """Build a histogram from raw durations (tests and simulated agents)."""
    h = Histogram(bits)
    for v in values_ns:
        i = bucket_index(v, bits)
        h.buckets[i] = h.buckets.get(i, 0) + 1
        h.count += 1
        h.sum_seconds += v * NS
    return h
