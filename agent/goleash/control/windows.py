"""Time windows: counters and gauges in rings of fixed time slots.

Two tiers by default: 5 s slots for windows up to a minute and 30 s slots up to five
minutes, so a key costs 24 slots instead of 60 while "last 10 s / 1 min / 5 min"
stay answerable. A window is served by the finest tier that spans it and covers at
least the requested seconds and at most one slot more (the slot being filled is
partial); callers report the span actually covered. Time is whatever clock the
caller passes (the control plane uses its own receive time, not agents' clocks).
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from goleash.control.histogram import Histogram


class Kind(IntEnum):
    SUM = 0  # counters: added up over the slots of a window
    LAST = 1  # gauges: the latest value recorded in a slot
    MAX = 2  # gauges: the largest value recorded in a slot


@dataclass(frozen=True)
class Tier:
    slot_seconds: float
    slots: int

    @property
    def span(self) -> float:
        """Longest window this tier answers (one slot is always being filled)."""
        return self.slot_seconds * (self.slots - 1)


DEFAULT_TIERS: tuple[Tier, ...] = (Tier(5.0, 13), Tier(30.0, 11))


def retention(tiers: Sequence[Tier] = DEFAULT_TIERS) -> float:
    return max(t.span for t in tiers)


def pick_tier(window: float, tiers: Sequence[Tier] = DEFAULT_TIERS) -> int:
    """Index of the finest tier spanning `window` seconds (window <= retention)."""
    for i, t in enumerate(tiers):
        if window <= t.span + 1e-9:
            return i
    raise ValueError(f"window {window:g}s is longer than the retention {retention(tiers):g}s")


def _slot_range(tier: Tier, now: float, window: float) -> tuple[int, int]:
    last = int(now // tier.slot_seconds)
    # enough whole slots before the current one to cover `window`
    first = last - int(-(-window // tier.slot_seconds))
    return max(first, last - tier.slots + 1), last


def covered(now: float, window: float, tiers: Sequence[Tier] = DEFAULT_TIERS) -> float:
    """Seconds a window query at `now` really spans."""
    tier = tiers[pick_tier(window, tiers)]
    first, _ = _slot_range(tier, now, window)
    return now - first * tier.slot_seconds


class Layout:
    """What a family of Windows shares: metric kinds and tiers (one per kind tuple)."""

    def __init__(self, kinds: Sequence[Kind], tiers: Sequence[Tier]) -> None:
        self.kinds, self.tiers = tuple(kinds), tuple(tiers)
        self.k = len(self.kinds)
        self.slots = sum(t.slots for t in self.tiers)
        offsets = [sum(t.slots for t in self.tiers[:i]) for i in range(len(self.tiers))]
        # (first position, slot width, slot count) per tier
        self.params = tuple(
            (o, t.slot_seconds, t.slots) for o, t in zip(offsets, self.tiers, strict=True)
        )
        self.sums = tuple(j for j, kd in enumerate(self.kinds) if kd is Kind.SUM)
        self.lasts = tuple(j for j, kd in enumerate(self.kinds) if kd is Kind.LAST)
        self.maxes = tuple(j for j, kd in enumerate(self.kinds) if kd is Kind.MAX)
        self.zeros = array("f", [0.0]) * self.k

    def positions(self, now: float, window: float) -> list[tuple[int, int, float]]:
        """(slot number, array position, slot end) of the window's slots, oldest first."""
        ti = pick_tier(window, self.tiers)
        off, width, n = self.params[ti]
        first, last = _slot_range(self.tiers[ti], now, window)
        return [(s, off + s % n, min((s + 1) * width, now)) for s in range(first, last + 1)]


@functools.cache
def layout(kinds: tuple[Kind, ...], tiers: tuple[Tier, ...] = DEFAULT_TIERS) -> Layout:
    return Layout(kinds, tiers)


class Windows:
    """K metrics of one key in the slots of every tier, in two flat arrays (~0.6 KB).

    Recording runs ~30 times per process snapshot, the control plane's hottest code:
    it is a few tight loops over array positions. Values are float32 (counts are exact
    up to 2^24 per slot)."""

    __slots__ = ("_layout", "_stamp", "_v")

    def __init__(self, kinds: Sequence[Kind], tiers: Sequence[Tier] = DEFAULT_TIERS) -> None:
        self._layout = lay = layout(tuple(kinds), tuple(tiers))
        self._stamp = array("q", [-1]) * lay.slots
        self._v = array("f", [0.0]) * (lay.slots * lay.k)

    def record(self, t: float, values: Sequence[float]) -> None:
        lay = self._layout
        k, v, stamp = lay.k, self._v, self._stamp
        for off, width, n in lay.params:
            slot = int(t // width)
            pos = off + slot % n
            base = pos * k
            if stamp[pos] != slot:
                stamp[pos] = slot
                v[base : base + k] = lay.zeros
            for j in lay.sums:
                v[base + j] += values[j]
            for j in lay.lasts:
                v[base + j] = values[j]
            for j in lay.maxes:
                if values[j] > v[base + j]:
                    v[base + j] = values[j]

    def total(self, now: float, window: float, metric: int) -> float:
        k, v, stamp = self._layout.k, self._v, self._stamp
        return sum(
            v[pos * k + metric]
            for s, pos, _ in self._layout.positions(now, window)
            if stamp[pos] == s
        )

    def series(self, now: float, window: float, metric: int) -> list[tuple[float, float]]:
        """(time, value) per slot with data, oldest first; time is the slot's end."""
        k, v, stamp = self._layout.k, self._v, self._stamp
        return [
            (end, v[pos * k + metric])
            for s, pos, end in self._layout.positions(now, window)
            if stamp[pos] == s
        ]

    def latest_time(self) -> float:
        """End of the newest slot with data (-inf when empty)."""
        off, width, n = self._layout.params[0]
        newest = max(self._stamp[off : off + n])
        return (newest + 1) * width if newest >= 0 else float("-inf")


class HistogramWindows:
    """Latency histograms per slot, in every tier; a window merges its slots.

    A slot's buckets are a plain {index: count} dict (the garbage collector does not
    track those), its count and sum sit in arrays. All slots share one layout
    (`bits`): a histogram with fewer sub-bucket bits coarsens the whole structure."""

    __slots__ = (
        "_calls",
        "_calls_err2",
        "_count",
        "_layout",
        "_slots",
        "_stamp",
        "_sum",
        "bits",
        "last_record",
    )

    def __init__(self, tiers: Sequence[Tier] = DEFAULT_TIERS) -> None:
        self._layout = lay = layout((Kind.SUM,), tuple(tiers))
        self.bits = -1
        self.last_record = float("-inf")  # time of the newest record
        self._stamp = array("q", [-1]) * lay.slots
        self._count = array("q", [0]) * lay.slots
        self._sum = array("d", [0.0]) * lay.slots
        # Every call (timed or not; timing may be sampled), and the squared +- bounds
        # of the estimated ones (independent estimates: bounds add in quadrature).
        self._calls = array("q", [0]) * lay.slots
        self._calls_err2 = array("d", [0.0]) * lay.slots
        self._slots: list[dict[int, int] | None] = [None] * lay.slots

    def _coarsen(self, bits: int) -> None:
        for pos, d in enumerate(self._slots):
            if d:
                h = Histogram(self.bits, d)
                h.coarsen(bits)
                self._slots[pos] = h.buckets
        self.bits = bits

    def record(
        self,
        t: float,
        bits: int,
        buckets: Sequence[tuple[int, int]],
        count: int,
        sum_s: float,
        calls: int | None = None,
        calls_error: float = 0.0,
    ) -> None:
        """`count` calls timed; `calls` all calls (None: only the timed are known)."""
        if self.bits < 0:
            self.bits = bits
        elif bits < self.bits:
            self._coarsen(bits)
        if bits != self.bits:  # finer than what we keep: bring it to our layout
            h = Histogram(self.bits)
            h.add(bits, buckets, count, sum_s)
            buckets = list(h.buckets.items())
        stamp, slots = self._stamp, self._slots
        self.last_record = max(self.last_record, t)
        for off, width, n in self._layout.params:
            slot = int(t // width)
            pos = off + slot % n
            d = slots[pos]
            if stamp[pos] != slot or d is None:
                stamp[pos] = slot
                d = slots[pos] = {}
                self._count[pos] = 0
                self._sum[pos] = 0.0
                self._calls[pos] = 0
                self._calls_err2[pos] = 0.0
            for idx, c in buckets:
                d[idx] = d.get(idx, 0) + c
            self._count[pos] += count
            self._sum[pos] += sum_s
            self._calls[pos] += count if calls is None else max(calls, count)
            self._calls_err2[pos] += calls_error * calls_error

    def calls(self, now: float, window: float) -> tuple[int, float]:
        """Every call in the window's slots, and the +- bound of that (0: exact)."""
        n, err2 = 0, 0.0
        for s, pos, _ in self._layout.positions(now, window):
            if self._stamp[pos] == s and self._slots[pos] is not None:
                n += self._calls[pos]
                err2 += self._calls_err2[pos]
        return n, err2**0.5

    def merged(self, now: float, window: float, into: Histogram | None = None) -> Histogram | None:
        """Merge the window's slots into `into` (or a new histogram); None when no data."""
        out = into
        for s, pos, _ in self._layout.positions(now, window):
            d = self._slots[pos]
            if self._stamp[pos] == s and d is not None:
                if out is None:
                    out = Histogram(self.bits)
                out.add(self.bits, d.items(), self._count[pos], self._sum[pos])
        return out
