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

The cost per hit is this host's: measured by the agent (probes/hitcost.py: an empty
probe's hit, times the share goleash's programs add) when first needed and again
every 10 minutes, since it varies several-fold between hosts and with load. Where it
cannot be measured (no root) the project's CI figures below are used;
GOLEASH_HIT_COST_NS="emulated,stepped" sets them outright.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("goleash.agent")

# ns per hit, measured by `make bench` on the project's VMs (DESIGN.md: 557 ns at
# emulated sites, 13,900-20,000 ns single-stepped): used when the host's own cannot
# be measured.
DEFAULT_EMULATED_NS = 600.0
DEFAULT_STEPPED_NS = 15_000.0
DEFAULT_CPU_FRACTION = 0.01  # 1% of one core per traced process

# A measurement taken while the host is busy (an agent starting with its node) can
# be twice a quiet one; a governor fed it for the agent's whole life keeps probes
# off that would fit. So the cost is measured again every REMEASURE_S and the median
# of the last KEPT_MEASUREMENTS is used: it follows the host, and one measurement
# taken at a bad moment moves nothing. Each measurement costs ~0.1 CPU-s.
REMEASURE_S = 600.0
KEPT_MEASUREMENTS = 3


@dataclass
class HostCosts:
    """This host's measured hit costs: the recent measurements and when the last
    one was taken."""

    measure: Callable[[], tuple[float, float]]
    clock: Callable[[], float] = time.monotonic
    recent: list[tuple[float, float]] = field(default_factory=list)
    measured_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def costs(self) -> tuple[float, float]:
        """(emulated, stepped) ns: the median of the kept measurements, refreshed
        when the last one is older than REMEASURE_S."""
        with self._lock:
            now = self.clock()
            if self.measured_at is None or now - self.measured_at >= REMEASURE_S:
                self.recent = [*self.recent, self.measure()][-KEPT_MEASUREMENTS:]
                self.measured_at = now
            return (
                statistics.median(c[0] for c in self.recent),
                statistics.median(c[1] for c in self.recent),
            )


@functools.lru_cache(maxsize=4)  # read at every budget judgement: warn once
def _from_env(raw: str) -> tuple[float, float] | None:
    try:
        emulated, stepped = (float(x) for x in raw.split(","))
    except ValueError:
        emulated = stepped = math.nan
    if not all(math.isfinite(c) and c > 0 for c in (emulated, stepped)):
        log.warning(
            "GOLEASH_HIT_COST_NS=%r ignored: it must be two positive numbers of ns, "
            "'emulated,stepped' (e.g. '600,15000'); measuring this host instead",
            raw[:64],
        )
        return None
    return emulated, stepped


def hit_costs_ns() -> tuple[float, float]:
    """(emulated, single-stepped) ns a goleash probe hit costs a traced thread here."""
    raw = os.environ.get("GOLEASH_HIT_COST_NS")
    if raw and (costs := _from_env(raw)) is not None:
        return costs
    return _host.costs()


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


_host = HostCosts(_measure_host)


@dataclass
class OverheadBudget:
    """Per-process budget. Feed it each interval's hit counts; it says whether
    the probes may stay attached (hysteresis: back on only below half the cap)."""

    cpu_fraction: float = DEFAULT_CPU_FRACTION
    over: bool = False
    last_fraction: float = 0.0

    @property
    def emulated_ns(self) -> float:
        return self.hit_costs()[0]

    @property
    def stepped_ns(self) -> float:
        return self.hit_costs()[1]

    def hit_costs(self) -> tuple[float, float]:
        """(emulated, stepped) ns per hit; the agent's first call measures them (~0.3
        s): make it before attaching probes that run until the budget is first judged.
        A budget nobody counts with (no probes attached) never costs a measurement."""
        return hit_costs_ns()

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
