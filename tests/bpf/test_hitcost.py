"""The host's uprobe hit cost, measured in the agent's own process (probes/hitcost.py):
what the overhead budget counts probe hits with."""

from __future__ import annotations

import os

import pytest

from goleash.probes import budget, hitcost
from probe_evidence import uprobe_fds

pytestmark = pytest.mark.root


def test_single_stepped_hits_cost_more_than_emulated_ones_and_nothing_stays() -> None:
    before = uprobe_fds(os.getpid())
    c = hitcost.measure()
    # The kernel emulates `push` and single-steps `mov` (a debug trap): the same empty
    # program costs several times more there, on any x86 host.
    assert 0 < c.emulated_ns < c.stepped_ns
    assert uprobe_fds(os.getpid()) == before  # its probes are gone again


def test_budget_counts_with_the_measured_cost_and_keeps_it_between_measurements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GOLEASH_HIT_COST_NS", raising=False)
    monkeypatch.setattr(budget, "_host", budget.HostCosts(budget._measure_host))
    emulated, stepped = budget.hit_costs_ns()
    assert 0 < emulated < stepped
    assert budget.hit_costs_ns() == (emulated, stepped)  # kept until REMEASURE_S
    b = budget.OverheadBudget()
    assert (b.emulated_ns, b.stepped_ns) == (emulated, stepped)
