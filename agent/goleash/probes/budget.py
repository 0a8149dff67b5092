"""The overhead budget: what our probe hits cost a traced process, kept under a cap.

A uprobe hit is a kernel trap taken by the traced thread. Its cost depends on the
probed instruction: the x86 uprobe code emulates push/call/jmp/jcc/nop (cheap) and
single-steps everything else (a debug trap; on VMs a VM exit). We know each
probe's hit count per interval from its own BPF counter, so the cost we impose is
hits x cost-per-hit, as a fraction of one CPU core over the interval.

The budget is a share of one core, per traced process: 0.01 (the default) lets the
probes cost the process at most 1% of a core over each interval. Infinity (`--budget
none`) sets no limit: every call is timed, every probe stays attached. 0 allows no
probe cost at all: function latency refuses it (nothing could be counted or timed);
the goroutine tracker detaches its probes at the first interval they cost anything
and counts from memory only.

The cost per hit is this host's: measured once per agent process (probes/hitcost.py:
an empty probe's hit, times the share goleash's programs add), since it varies
several-fold between hosts and with load. Where it cannot be measured (no root, no
BCC) the project's CI figures below are used; GOLEASH_HIT_COST_NS="emulated,stepped"
sets them outright.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

log = logging.getLogger("goleash.agent")

# ns per hit, measured by `make bench` on the project's VMs (DESIGN.md: 557 ns at
# emulated sites, 13,900-20,000 ns single-stepped): used when the host's own cannot
# be measured.
DEFAULT_EMULATED_NS = 600.0
DEFAULT_STEPPED_NS = 15_000.0
DEFAULT_CPU_FRACTION = 0.01  # 1% of one core per traced process

_measured: tuple[float, float] | None = None
_measure_lock = threading.Lock()


def hit_costs_ns() -> tuple[float, float]:
    """(emulated, single-stepped) ns a goleash probe hit costs a traced thread here."""
    raw = os.environ.get("GOLEASH_HIT_COST_NS")
    if raw:
        emulated, stepped = (float(x) for x in raw.split(","))
        return emulated, stepped
    global _measured
    with _measure_lock:
        if _measured is None:
            _measured = _measure_host()
        return _measured


def _measure_host() -> tuple[float, float]:
    from goleash.probes.hitcost import PROGRAM_FACTOR, HitCostError, measure

    try:
        c = measure()
    except HitCostError as exc:
        log.info("uprobe hit cost not measured (%s): budget uses the defaults", exc)
        return DEFAULT_EMULATED_NS, DEFAULT_STEPPED_NS
    costs = c.emulated_ns * PROGRAM_FACTOR, c.stepped_ns * PROGRAM_FACTOR
    log.info(
        "uprobe hit cost on this host: %.0f ns emulated, %.0f ns single-stepped "
        "(goleash's programs included); the overhead budget counts with these",
        *costs,
    )
    return costs


@dataclass
class OverheadBudget:
    """Per-process budget. Feed it each interval's hit counts; it says whether
    the probes may stay attached (hysteresis: back on only below half the cap)."""

    cpu_fraction: float = DEFAULT_CPU_FRACTION
    over: bool = False
    last_fraction: float = 0.0
    # (emulated, stepped) ns per hit, measured when first needed: a budget nobody
    # counts with (no probes attached) never costs a measurement
    _costs: tuple[float, float] | None = field(default=None, repr=False)

    @property
    def emulated_ns(self) -> float:
        return self.hit_costs()[0]

    @property
    def stepped_ns(self) -> float:
        return self.hit_costs()[1]

    def hit_costs(self) -> tuple[float, float]:
        """(emulated, stepped) ns per hit; the first call may measure them (~0.3 s):
        make it before attaching probes that run until the budget is first judged."""
        if self._costs is None:
            self._costs = hit_costs_ns()
        return self._costs

    def cost_fraction(self, emulated_hits: int, stepped_hits: int, interval_s: float) -> float:
        """Fraction of one core the hits cost the traced process over the interval."""
        if interval_s <= 0:
            return 0.0
        ns = emulated_hits * self.emulated_ns + stepped_hits * self.stepped_ns
        return ns / (interval_s * 1e9)

    def update(self, emulated_hits: int, stepped_hits: int, interval_s: float) -> bool:
        """Record an interval; returns True when the probes should be (or stay) detached."""
        self.last_fraction = self.cost_fraction(emulated_hits, stepped_hits, interval_s)
        if self.last_fraction > self.cpu_fraction:
            self.over = True
        elif self.over and self.last_fraction < self.cpu_fraction / 2:
            self.over = False
        return self.over

    def duty_cycle(self, projected_fraction: float) -> float:
        """Share of an interval probes can stay attached to cost at most the cap
        (1.0 when the full-time cost fits). Used to sample hot functions."""
        if projected_fraction <= self.cpu_fraction:
            return 1.0
        return max(0.0, self.cpu_fraction / projected_fraction)
