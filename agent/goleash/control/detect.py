"""Leak suspects: creation sites whose live count keeps growing while their oldest
members keep ageing (DESIGN.md, "Orphans and leaks").

Pure functions over a site's time series, so the rules are testable on plain data.
Why both conditions: a site that grows because load grows recycles its goroutines
(its oldest member stays young), and a long-lived healthy population (accept loop,
ticker, worker pool) does not grow. Only goroutines that pile up and never end do
both. Orphans are flagged by agents (they see parents and wait reasons); the control
plane groups them (see state.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LeakParams:
    """Thresholds of the leak-suspect rule."""

    window_seconds: float = 60.0
    min_span_seconds: float = 30.0  # less history than this: no opinion
    min_points: int = 4
    min_growth: float = 10.0  # goroutines over the window, absolute ...
    min_growth_ratio: float = 0.05  # ... and relative to the count at the start
    min_steady_fraction: float = 0.7  # share of steps where the live count did not fall
    max_drawdown: float = 0.1  # the count now is within 10 % of the window's peak
    min_age_progress: float = 0.7  # the oldest member aged >= 70 % of the elapsed time


DEFAULT_LEAK_PARAMS = LeakParams()


@dataclass(frozen=True)
class SitePoint:
    """A site's state at time t: live goroutines and the age of the oldest one."""

    t: float
    live: float
    oldest_age: float


@dataclass(frozen=True)
class LeakVerdict:
    """Evidence that a site leaks."""

    live: float
    live_at_start: float
    growth_per_minute: float
    steady_fraction: float
    span_seconds: float
    oldest_age_start: float
    oldest_age: float


def assess(
    points: Sequence[SitePoint], params: LeakParams = DEFAULT_LEAK_PARAMS
) -> LeakVerdict | None:
    """A verdict when the series shows a leak, else None (including "not enough data").

    An unknown oldest age (0: the agent could not tell ages) never makes a suspect:
    without it, growth alone cannot be told from a load increase.
    """
    if len(points) < max(params.min_points, 2):
        return None
    first, last = points[0], points[-1]
    span = last.t - first.t
    if span < params.min_span_seconds:
        return None
    growth = last.live - first.live
    if growth < max(params.min_growth, params.min_growth_ratio * first.live):
        return None
    steps = list(zip(points, points[1:], strict=False))
    steady = sum(1 for a, b in steps if b.live >= a.live) / len(steps)
    if steady < params.min_steady_fraction:
        return None
    if last.live < (1 - params.max_drawdown) * max(p.live for p in points):
        return None
    if first.oldest_age <= 0 or last.oldest_age - first.oldest_age < params.min_age_progress * span:
        return None
    return LeakVerdict(
        live=last.live,
        live_at_start=first.live,
        growth_per_minute=growth / span * 60.0,
        steady_fraction=steady,
        span_seconds=span,
        oldest_age_start=first.oldest_age,
        oldest_age=last.oldest_age,
    )


def growth_per_minute(series: Sequence[tuple[float, float]]) -> float:
    """Change per minute between the first and last (time, value) points (0 if < 2)."""
    if len(series) < 2 or series[-1][0] <= series[0][0]:
        return 0.0
    return (series[-1][1] - series[0][1]) / (series[-1][0] - series[0][0]) * 60.0
