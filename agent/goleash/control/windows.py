"""Time windows: counters and gauges in rings of fixed time slots.

Two tiers by default: 5 s slots for windows up to a minute and 30 s slots up to five
minutes, so a key costs 24 slots instead of 60 while "last 10 s / 1 min / 5 min"
stay answerable. A window is served by the finest tier that spans it and covers at
least the requested seconds and at most one slot more (the slot being filled is
partial); callers report the span actually covered. Time is whatever clock the
caller passes (the control plane uses its own receive time, not agents' clocks).
"""

from __future__ import annotations

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


class Ring:
    """K metrics of one key in the slots of one tier (flat arrays: ~1 KB per key)."""

    __slots__ = ("_kinds", "_stamp", "_tier", "_v")

    def __init__(self, tier: Tier, kinds: Sequence[Kind]) -> None:
        self._tier = tier
        self._kinds = tuple(kinds)
        self._stamp = array("q", [-1]) * tier.slots
        self._v = array("d", [0.0]) * (tier.slots * len(kinds))

    def record(self, t: float, values: Sequence[float]) -> None:
        slot = int(t // self._tier.slot_seconds)
        i = slot % self._tier.slots
        k = len(self._kinds)
        base = i * k
        v = self._v
        if self._stamp[i] != slot:
            self._stamp[i] = slot
            for j in range(k):
                v[base + j] = 0.0
        for j, kind in enumerate(self._kinds):
            if kind is Kind.SUM:
                v[base + j] += values[j]
            elif kind is Kind.LAST or values[j] > v[base + j]:
                v[base + j] = values[j]

    def _slots(self, now: float, window: float) -> list[tuple[int, int]]:
        """(slot number, ring position) of the slots with data inside the window."""
        first, last = _slot_range(self._tier, now, window)
        n = self._tier.slots
        return [(s, s % n) for s in range(first, last + 1) if self._stamp[s % n] == s]

    def total(self, now: float, window: float, metric: int) -> float:
        k = len(self._kinds)
        return sum(self._v[i * k + metric] for _, i in self._slots(now, window))

    def series(self, now: float, window: float, metric: int) -> list[tuple[float, float]]:
        """(time, value) per slot with data, oldest first; time is the slot's end."""
        k, width = len(self._kinds), self._tier.slot_seconds
        return [
            (min((s + 1) * width, now), self._v[i * k + metric])
            for s, i in self._slots(now, window)
        ]

    def latest_time(self) -> float:
        """End of the newest slot with data (-inf when empty)."""
        newest = max(self._stamp)
        return (newest + 1) * self._tier.slot_seconds if newest >= 0 else float("-inf")


class Windows:
    """The same metrics kept in every tier; queries pick the tier by window length."""

    __slots__ = ("_rings", "_tiers")

    def __init__(self, kinds: Sequence[Kind], tiers: Sequence[Tier] = DEFAULT_TIERS) -> None:
        self._tiers = tuple(tiers)
        self._rings = tuple(Ring(t, kinds) for t in self._tiers)

    def record(self, t: float, values: Sequence[float]) -> None:
        for r in self._rings:
            r.record(t, values)

    def total(self, now: float, window: float, metric: int) -> float:
        return self._rings[pick_tier(window, self._tiers)].total(now, window, metric)

    def series(self, now: float, window: float, metric: int) -> list[tuple[float, float]]:
        return self._rings[pick_tier(window, self._tiers)].series(now, window, metric)

    def latest_time(self) -> float:
        return self._rings[0].latest_time()


class HistogramWindows:
    """Latency histograms per slot, in every tier; a window merges its slots."""

    __slots__ = ("_slots", "_stamps", "_tiers")

    def __init__(self, tiers: Sequence[Tier] = DEFAULT_TIERS) -> None:
        self._tiers = tuple(tiers)
        self._stamps = [array("q", [-1]) * t.slots for t in self._tiers]
        self._slots: list[list[Histogram | None]] = [[None] * t.slots for t in self._tiers]

    def record(
        self, t: float, bits: int, buckets: Sequence[tuple[int, int]], count: int, sum_s: float
    ) -> None:
        for tier, stamps, slots in zip(self._tiers, self._stamps, self._slots, strict=True):
            slot = int(t // tier.slot_seconds)
            i = slot % tier.slots
            h = slots[i]
            if stamps[i] != slot or h is None:
                stamps[i] = slot
                h = slots[i] = Histogram(bits)
            h.add(bits, buckets, count, sum_s)

    def merged(self, now: float, window: float, into: Histogram | None = None) -> Histogram | None:
        """Merge the window's slots into `into` (or a new histogram); None when no data."""
        ti = pick_tier(window, self._tiers)
        tier, stamps, slots = self._tiers[ti], self._stamps[ti], self._slots[ti]
        first, last = _slot_range(tier, now, window)
        out = into
        for s in range(first, last + 1):
            i = s % tier.slots
            h = slots[i]
            if stamps[i] == s and h is not None:
                if out is None:
                    out = Histogram(h.bits)
                out.merge(h)
        return out

    def latest_time(self) -> float:
        tier, stamps = self._tiers[0], self._stamps[0]
        newest = max(stamps)
        return (newest + 1) * tier.slot_seconds if newest >= 0 else float("-inf")
