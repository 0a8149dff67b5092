"""The overhead budget's cost per hit: set outright, measured, or the defaults when
it cannot be measured (no root, no BCC)."""

from __future__ import annotations

import pytest

from goleash.probes import budget, hitcost


def test_env_sets_the_costs_outright(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOLEASH_HIT_COST_NS", "800,12000")
    b = budget.OverheadBudget()
    assert (b.emulated_ns, b.stepped_ns) == (800.0, 12000.0)
    # 1,000 emulated + 100 stepped hits over 1 s: 2 ms of 1 s of a core.
    assert b.cost_fraction(1000, 100, 1.0) == pytest.approx(0.002)


def test_defaults_when_the_host_cannot_be_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> hitcost.HitCosts:
        raise hitcost.HitCostError("measuring uprobe hits needs root")

    monkeypatch.delenv("GOLEASH_HIT_COST_NS", raising=False)
    monkeypatch.setattr(budget, "_host", budget.HostCosts(budget._measure_host))
    monkeypatch.setattr(hitcost, "measure", refuse)
    assert budget.hit_costs_ns() == (budget.DEFAULT_EMULATED_NS, budget.DEFAULT_STEPPED_NS)


def test_costs_are_measured_again_and_one_bad_moment_moves_nothing() -> None:
    """An agent that started on a busy node must not count with that moment's cost
    for its whole life; one measurement taken under a load spike must not count."""
    now = [0.0]
    taken = iter([(600.0, 10_000.0), (1_800.0, 40_000.0), (650.0, 11_000.0), (620.0, 9_000.0)])
    host = budget.HostCosts(lambda: next(taken), clock=lambda: now[0])
    assert host.costs() == (600.0, 10_000.0)
    now[0] = budget.REMEASURE_S - 1
    assert host.costs() == (600.0, 10_000.0)  # not measured again yet
    now[0] = budget.REMEASURE_S
    assert host.costs() == (1_200.0, 25_000.0)  # two kept: their median
    now[0] = 2 * budget.REMEASURE_S
    assert host.costs() == (650.0, 11_000.0)  # the spike is outvoted
    now[0] = 3 * budget.REMEASURE_S
    assert host.costs() == (650.0, 11_000.0)  # the oldest dropped: 1800, 650, 620
    assert len(host.recent) == budget.KEPT_MEASUREMENTS


@pytest.mark.parametrize("raw", ["nan,15000", "600,inf", "-1,15000", "600", "a,b", "0,0"])
def test_bad_env_costs_are_ignored_not_counted_with(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("GOLEASH_HIT_COST_NS", raw)
    monkeypatch.setattr(budget, "_host", budget.HostCosts(lambda: (700.0, 12_000.0)))
    assert budget.hit_costs_ns() == (700.0, 12_000.0)
