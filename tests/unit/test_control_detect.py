"""Leak-suspect rule on plain time series: leaks are reported, healthy populations not."""

from __future__ import annotations

from goleash.control.detect import LeakParams, SitePoint, assess, growth_per_minute

STEP = 5.0  # an agent's interval


def series(live: list[float], oldest: list[float]) -> list[SitePoint]:
    return [SitePoint(i * STEP, lv, o) for i, (lv, o) in enumerate(zip(live, oldest, strict=True))]


def ageing(n: int, start: float = 30.0) -> list[float]:
    """The oldest member never exits: it ages one second per second."""
    return [start + i * STEP for i in range(n)]


def test_a_site_that_piles_up_goroutines_that_never_end_is_a_suspect() -> None:
    live = [100 + 12 * i for i in range(13)]  # +12 per 5 s over one minute
    v = assess(series(live, ageing(13)))
    assert v is not None
    assert v.live_at_start == 100 and v.live == live[-1]
    assert abs(v.growth_per_minute - 12 * 60 / STEP) < 1e-9
    assert v.steady_fraction == 1.0
    assert v.oldest_age - v.oldest_age_start == 12 * STEP


def test_a_leak_with_noise_is_still_a_suspect() -> None:
    live = [100, 110, 108, 125, 140, 138, 150, 165, 170, 169, 185, 200, 210]
    assert assess(series(live, ageing(13))) is not None


def test_worker_pool_and_accept_loop_are_not_suspects() -> None:
    # long-lived, ageing, but not growing: a pool of 64 workers, an accept loop, a ticker
    for n in (64, 1, 1):
        assert assess(series([n] * 13, ageing(13, start=3600))) is None


def test_growth_from_load_whose_goroutines_finish_is_not_a_suspect() -> None:
    # requests in flight grow with load, but each finishes: the oldest stays young
    live = [50 + 20 * i for i in range(13)]
    young = [1.5, 2.0, 1.2, 1.8, 2.2, 1.1, 1.9, 2.4, 1.6, 2.0, 1.3, 2.1, 1.7]
    assert assess(series(live, young)) is None


def test_a_burst_that_drains_again_is_not_a_suspect() -> None:
    live = [100, 300, 500, 700, 900, 700, 500, 300, 200, 150, 140, 130, 130]
    assert assess(series(live, ageing(13))) is None


def test_growth_too_small_for_the_population_is_not_a_suspect() -> None:
    live = [10_000 + i for i in range(13)]  # +12 on 10k: noise
    assert assess(series(live, ageing(13))) is None


def test_no_opinion_without_enough_history_or_without_ages() -> None:
    live = [10, 30, 50]
    assert assess(series(live, ageing(3))) is None
    ramp = [10 + 20 * i for i in range(13)]
    assert assess(series(ramp, [0.0] * 13)) is None  # agent could not tell ages


def test_thresholds_are_parameters() -> None:
    live = [10 + 2 * i for i in range(13)]  # +24 over a minute
    assert assess(series(live, ageing(13))) is not None
    assert assess(series(live, ageing(13)), LeakParams(min_growth=50)) is None


def test_growth_per_minute_of_a_series() -> None:
    assert growth_per_minute([(0.0, 10.0), (30.0, 40.0)]) == 60.0
    assert growth_per_minute([(0.0, 10.0)]) == 0.0
