"""Calls counted while timing is sampled: the arithmetic from the probes' reading to
the control plane's API and Prometheus, and the --budget values the CLI accepts."""

from __future__ import annotations

import argparse
import math

import pytest

from agentsim import SimAgent, process_info, snapshot
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.cli import budget_arg
from goleash.control import answers
from goleash.control.state import Store
from goleash.node.funcwatch import FuncTotals
from goleash.node.metrics import cumulative_buckets
from goleash.probes.funcrecord import FunctionLatency
from goleash.probes.hist import Histogram

T0 = 1_000_000.0


def reading(timed: list[int], *, calls: int, counted_s: float | None = None) -> FunctionLatency:
    """One interval of 1 s: `timed` durations; `calls` counted over `counted_s` of it
    (None: the entry probe was attached throughout, so the count is exact)."""
    r = FunctionLatency("main.f", Histogram.of(timed), window_s=1.0)
    r.entry_hits = calls
    if counted_s is None:
        r.exact_calls = calls
    else:
        r.sampled_hits, r.sampled_counted_s, r.sampled_window_s = calls, counted_s, 1.0
    return r


def test_exact_calls_survive_sampled_timing() -> None:
    r = reading([1000] * 25, calls=100) + reading([3000] * 20, calls=80)
    assert (r.calls, r.timed, r.calls_exact, r.calls_error) == (180, 45, True, 0.0)
    d = r.to_dict()
    assert (d["calls"], d["timed"], d["calls_exact"]) == (180, 45, True)
    assert sum(b[3] for b in d["histogram"]["buckets"]) == 45


def test_calls_estimated_when_the_entry_probe_was_sampled() -> None:
    # 400 calls counted in a quarter of the window, plus an exactly counted interval
    r = reading([1000] * 10, calls=400, counted_s=0.25) + reading([1000], calls=50)
    assert not r.calls_exact
    assert r.calls == 50 + 1600
    err = r.calls_error
    assert err is not None and err == pytest.approx(2 * math.sqrt(401) * 4)
    assert reading([], calls=0, counted_s=0.0).calls_error is None  # never counted


def test_prometheus_count_means_every_call() -> None:
    tot = FuncTotals()
    tot.add(reading([1000] * 25, calls=100))  # each timed call stands for 4
    tot.add(reading([], calls=30))  # counted, none timed: only in +Inf
    assert (tot.count, tot.timed) == (130, 25)
    assert tot.sum_ns == pytest.approx(100 * 1000)
    rows = cumulative_buckets(tot.buckets, tot.count)
    assert rows[-1] == ("+Inf", 130.0)
    finite = [c for le, c in rows[:-1]]
    assert finite == sorted(finite) and finite[-1] == pytest.approx(100.0)


def test_control_plane_answers_calls_beside_timed() -> None:
    store = Store(lambda *a, **k: None)
    a = SimAgent("a")
    store.ingest(a.batch(appeared=[process_info(10, "api")]), T0)
    s1 = snapshot(10, latency={"main.call": [1_000_000] * 10})
    s1.latency[0].calls = 40
    s2 = snapshot(10, latency={"main.call": [1_000_000] * 5})
    s2.latency[0].calls, s2.latency[0].calls_error = 300, 30.0
    old = snapshot(10, latency={"main.call": [1_000_000] * 7})  # an agent without `calls`
    for i, s in enumerate((s1, s2, old)):
        store.ingest(a.batch(snapshots=[s]), T0 + 1 + i)
    resp = answers.function_latency(
        store, q.GetFunctionLatencyRequest(function="main.call"), T0 + 4
    )
    assert resp.count == 22  # timed
    assert resp.calls == 40 + 300 + 7
    assert resp.calls_error == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("text", "value"), [("none", math.inf), ("NONE", math.inf), ("0", 0.0), ("0.05", 0.05)]
)
def test_budget_values(text: str, value: float) -> None:
    assert budget_arg(text) == value


@pytest.mark.parametrize("text", ["-0.01", "nan", "inf-ish", "", "1e999"])
def test_budget_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a budget"):
        budget_arg(text)


def test_quantiles_weigh_each_interval_by_its_calls() -> None:
    """An interval whose calls were timed a tenth of the time counts for all its calls:
    100 calls of ~1 ms (10 timed) and 100 of ~5 ms (all timed) have a p25 near 1 ms."""
    fast = reading([1_000_000] * 10, calls=100)
    fast.sampled, fast.weighted = True, [c * 10.0 for c in fast.hist.counts]
    slow = reading([5_000_000] * 100, calls=100)
    both = fast + slow
    p25, p75 = both.quantile_ns(0.25), both.quantile_ns(0.75)
    assert p25 is not None and p25 < 1.1e6
    assert p75 is not None and p75 > 4.5e6
    assert both.timed == 110 and both.calls == 200


def test_a_slice_that_timed_a_handful_of_calls_cannot_move_the_quantiles() -> None:
    """Two intervals of 1,000 calls of ~4 ms: one slice timed 200 of them, the other
    caught only 2 calls, both ~1 ms. Weighing each interval by calls / timed alone
    would give those 2 calls half the weight (p50 ~1 ms); they count as if at least
    MIN_TIMED_WEIGHT calls had been timed, so p50 stays ~4 ms."""
    many = reading([4_000_000] * 200, calls=1000)
    few = reading([1_000_000] * 2, calls=1000)
    for r in (many, few):
        r.weigh()
    assert many.weighted is not None and few.weighted is not None
    both = many + few
    p50 = both.quantile_ns(0.5)
    assert p50 is not None and 3.8e6 < p50 < 4.4e6
    assert sum(few.weighted) < 0.1 * sum(many.weighted)
    assert (both.calls, both.timed, both.sampled) == (2000, 202, True)


def test_each_interval_weighs_by_its_calls_once_enough_were_timed() -> None:
    """Above MIN_TIMED_WEIGHT timed calls, an interval weighs by calls / timed: 100
    timed of 1,000 calls of ~1 ms against 1,000 of 1,000 calls of ~5 ms puts p25 in
    the fast mode and p75 in the slow one (unweighted, p25 would be ~5 ms)."""
    fast = reading([1_000_000] * 100, calls=1000)
    slow = reading([5_000_000] * 1000, calls=1000)
    for r in (fast, slow):
        r.weigh()
    both = fast + slow
    p25, p75 = both.quantile_ns(0.25), both.quantile_ns(0.75)
    assert p25 is not None and p25 < 1.1e6
    assert p75 is not None and p75 > 4.5e6
