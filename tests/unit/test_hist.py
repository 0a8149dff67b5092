"""The log-linear histogram shared by bpf/funclat.bpf.c and user space."""

from __future__ import annotations

import math
import random

import pytest

from goleash.probes import hist
from goleash.probes.hist import Histogram, bucket_bounds, bucket_of, exact_quantile

US, S = 1_000, 1_000_000_000


def test_buckets_tile_the_range_without_gaps() -> None:
    prev_hi = 0
    for i in range(hist.N_BUCKETS):
        lo, hi = bucket_bounds(i)
        assert lo == prev_hi and hi > lo
        assert bucket_of(lo) == i and bucket_of(hi - 1) == i
        if lo >= hist.SUB:  # log-linear part: at most 1/SUB of its lower bound wide
            assert (hi - lo) * hist.SUB <= lo
        prev_hi = hi
    assert bucket_of(10**15) == hist.N_BUCKETS - 1  # past 2^MAX_EXP ns: the last bucket
    assert hist.SLOTS >= hist.N_BUCKETS and hist.SLOTS & (hist.SLOTS - 1) == 0


@pytest.mark.parametrize("seed", range(5))
def test_quantiles_within_10_percent_from_1us_to_100s(seed: int) -> None:
    rng = random.Random(seed)
    # log-uniform over 1 µs .. 100 s, plus a few point masses (all calls alike)
    values = [int(math.exp(rng.uniform(math.log(US), math.log(100 * S)))) for _ in range(5000)]
    values += [rng.choice([US, 2 * 10**6, 100 * S])] * 700
    h = Histogram.of(values)
    assert h.count == len(values) and h.sum_ns == sum(values) and h.max_ns == max(values)
    for q in (*hist.QUANTILES, 0.0, 1.0):
        true = exact_quantile(values, q)
        assert abs(h.quantile(q) - true) <= 0.10 * true, (q, h.quantile(q), true)


@pytest.mark.parametrize("v", [US, 1_234_567, 40 * 10**6, 100 * S])
def test_a_single_value_is_its_own_quantiles(v: int) -> None:
    h = Histogram.of([v] * 3)
    for q in hist.QUANTILES:
        assert abs(h.quantile(q) - v) <= v / hist.SUB


def test_interval_deltas_add_up() -> None:
    rng = random.Random(1)
    a = [rng.randrange(US, S) for _ in range(300)]
    b = [rng.randrange(US, S) for _ in range(200)]
    first, both = Histogram.of(a), Histogram.of(a + b)
    delta = both.minus(first)
    assert delta.counts == Histogram.of(b).counts
    assert delta.count == len(b) and delta.sum_ns == sum(b)
    assert (first + delta).counts == both.counts
    assert math.isnan(Histogram().quantile(0.5))


def test_log2_rows_count_everything_once() -> None:
    h = Histogram.of([500, 1500, 3 * US, 3 * US, 5 * 10**6])
    rows = h.log2_rows()
    assert sum(c for _, _, c in rows) == h.count
    assert rows[0] == (0, 0, 1)  # below 1 µs
    assert (2, 3, 2) in rows  # 3 µs twice
