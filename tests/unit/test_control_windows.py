"""Log-linear histograms and time-slot rings of the control plane, on plain data."""

from __future__ import annotations

import random

import pytest

from goleash.control.histogram import (
    Histogram,
    bucket_bounds,
    bucket_index,
    from_values,
)
from goleash.control.windows import (
    DEFAULT_TIERS,
    HistogramWindows,
    Kind,
    Tier,
    Windows,
    covered,
    pick_tier,
)

RNG = random.Random(7)
VALUES = [0, 1, 2, 3, 7, 8, 9, 1000, 1023, 1024, 1025, 999_999, 10**6, 5 * 10**9, 2**40 + 17]
VALUES += [RNG.randrange(1, 10**11) for _ in range(2000)]


@pytest.mark.parametrize("bits", range(0, 9))
def test_every_value_falls_inside_its_bucket_and_the_bucket_is_narrow(bits: int) -> None:
    for v in VALUES:
        low, high = bucket_bounds(bucket_index(v, bits), bits)
        assert low <= v < high
        if v >= 1 << bits:
            assert (high - low) / low <= 2.0**-bits


@pytest.mark.parametrize("bits", range(0, 9))
def test_buckets_are_contiguous_and_ordered(bits: int) -> None:
    previous_high = 0
    for idx in range(0, 64 << bits if bits < 4 else 2000):
        low, high = bucket_bounds(idx, bits)
        assert low == previous_high and high > low
        assert bucket_index(low, bits) == idx
        previous_high = high


def test_coarsening_a_fine_histogram_equals_building_it_coarse() -> None:
    fine = from_values(VALUES, 6)
    fine.coarsen(2)
    assert fine.buckets == from_values(VALUES, 2).buckets


def test_merging_different_resolutions_lands_on_the_coarser() -> None:
    a, b = VALUES[: len(VALUES) // 2], VALUES[len(VALUES) // 2 :]
    h = from_values(a, 5)
    h.merge(from_values(b, 3))
    assert h.bits == 3
    assert h.buckets == from_values(VALUES, 3).buckets
    assert h.count == len(VALUES)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
def test_quantiles_are_within_one_bucket_of_the_exact_value(q: float) -> None:
    values = sorted(RNG.randrange(10_000, 10**9) for _ in range(5000))
    h = from_values(values, 4)
    exact = values[int(q * len(values)) - 1] * 1e-9
    (got,) = h.quantiles([q])
    assert abs(got - exact) / exact <= 2.0**-4 + 1e-9


def test_empty_histogram_has_zero_quantiles() -> None:
    assert Histogram(3).quantiles([0.5, 0.99]) == [0.0, 0.0]


# --- rings -------------------------------------------------------------------------


def test_ring_sums_counters_over_the_window_and_forgets_older_slots() -> None:
    r = Windows((Kind.SUM,), (Tier(5.0, 13),))
    for i in range(40):  # one count per second for 40 s, starting at t=1000
        r.record(1000.0 + i, (1,))
    now = 1039.5
    # a window covers at least its span and at most one slot more
    assert 10 <= r.total(now, 10, 0) <= 15
    assert r.total(now, 60, 0) == 40
    # 2 minutes later the ring has wrapped: nothing of it is left in a 60 s window
    assert r.total(now + 120, 60, 0) == 0


def test_ring_gauges_keep_last_and_max_per_slot() -> None:
    r = Windows((Kind.LAST, Kind.MAX), (Tier(5.0, 13),))
    r.record(100.0, (3, 3))
    r.record(101.0, (9, 9))
    r.record(102.0, (4, 4))
    assert r.series(103.0, 10, 0)[-1][1] == 4
    assert r.series(103.0, 10, 1)[-1][1] == 9


def test_windows_pick_the_finest_tier_that_spans_the_window() -> None:
    assert pick_tier(10) == 0 and pick_tier(60) == 0 and pick_tier(61) == 1
    assert pick_tier(300) == 1
    with pytest.raises(ValueError):
        pick_tier(301)
    for w in (10, 60, 120, 300):
        span = covered(12_345.6, w)
        slot = DEFAULT_TIERS[pick_tier(w)].slot_seconds
        assert w <= span <= w + slot


def test_five_minute_window_counts_what_the_one_minute_window_has_forgotten() -> None:
    w = Windows((Kind.SUM,))
    w.record(1000.0, (7,))
    w.record(1200.0, (1,))
    assert w.total(1210.0, 60, 0) == 1
    assert w.total(1210.0, 300, 0) == 8


def test_histogram_windows_merge_slots_and_coarsen_to_the_coarsest_layout() -> None:
    hw = HistogramWindows()
    fine, coarse = from_values(VALUES[:500], 5), from_values(VALUES[500:1000], 2)
    hw.record(1000.0, 5, list(fine.buckets.items()), fine.count, fine.sum_seconds)
    hw.record(1002.0, 2, list(coarse.buckets.items()), coarse.count, coarse.sum_seconds)
    merged = hw.merged(1003.0, 10)
    assert merged is not None and merged.bits == 2
    assert merged.buckets == from_values(VALUES[:1000], 2).buckets
    assert merged.count == 1000
    assert hw.merged(1400.0, 60) is None  # long gone from the window
