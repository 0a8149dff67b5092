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
    monkeypatch.setattr(budget, "_measured", None)
    monkeypatch.setattr(hitcost, "measure", refuse)
    assert budget.hit_costs_ns() == (budget.DEFAULT_EMULATED_NS, budget.DEFAULT_STEPPED_NS)
