"""The control plane's Prometheus `/metrics`.

Collected at scrape time from the Store, on the event loop that owns it (the HTTP
server runs in a thread; the Store is not thread-safe), so ingest pays nothing for
metrics. Series: agents and processes by state, per-service live goroutines, orphans
and leak suspects, batch counters, events written, the policy engine (each rule's
current level per service, decisions, action attempts and failures by action type,
evaluation duration), goleash_build_info, and the process's own CPU and memory
(prometheus_client's process collector).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import goleash
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.control.engine_stats import EVAL_BOUNDS_S, EngineCounts
from goleash.control.state import STALE_INTERVALS, Store
from goleash.errors import GoleashError

SCRAPE_TIMEOUT_S = 5.0


class MetricsListenError(GoleashError):
    """`--metrics-listen` cannot be served."""


@dataclass
class ControlView:
    """What one scrape reports, computed on the event loop."""

    agents: Counter[str] = field(default_factory=Counter)
    processes: Counter[str] = field(default_factory=Counter)
    goroutines: dict[str, int] = field(default_factory=dict)
    orphans: Counter[str] = field(default_factory=Counter)
    suspects: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    duplicates: int = 0
    gaps: int = 0
    events: int = 0
    # (service, rule) -> current level: 0 normal, N the rule's Nth level (L1 = 1)
    levels: dict[tuple[str, str], int] = field(default_factory=dict)
    engine: EngineCounts = field(default_factory=EngineCounts)


def view(store: Store, last_event_id: int, now: float, engine: Any = None) -> ControlView:
    """`engine`: the PolicyEngine (its rule states and stats), None without one."""
    v = ControlView(events=last_event_id)
    if engine is not None:
        v.levels = {(svc, rule): st.level + 1 for (rule, svc), st in engine.states.items()}
        v.engine = engine.stats.snapshot()
    for a in store.agents.values():
        if not a.streams:
            v.agents["disconnected"] += 1
        elif now - a.last_seen > STALE_INTERVALS * a.interval:
            v.agents["stale"] += 1
        else:
            v.agents["connected"] += 1
        v.batches += a.batches
        v.duplicates += a.duplicates
        v.gaps += a.gaps
    names: dict[int, str] = {
        q.PROCESS_STATE_RUNNING: "running",
        q.PROCESS_STATE_STALE: "stale",
        q.PROCESS_STATE_GONE: "gone",
    }
    for p in store.procs.values():
        v.processes[names[store.process_state(p, now)]] += 1
        v.orphans[p.service] += p.orphans
    v.goroutines = {name: svc.goroutines for name, svc in store.services.items()}
    for service, _site in store.suspects:
        v.suspects[service] += 1
    return v


class ControlCollector(Collector):
    def __init__(self, snapshot: Callable[[], ControlView]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        v = self._snapshot()
        g = GaugeMetricFamily("goleash_control_agents", "Agents by state.", labels=["state"])
        for state in ("connected", "stale", "disconnected"):
            g.add_metric([state], v.agents[state])
        yield g
        g = GaugeMetricFamily(
            "goleash_control_processes", "Followed processes by state.", labels=["state"]
        )
        for state in ("running", "stale", "gone"):
            g.add_metric([state], v.processes[state])
        yield g
        for name, doc, values in (
            ("goleash_control_service_goroutines", "Live goroutines per service.", v.goroutines),
            ("goleash_control_service_orphans", "Live orphaned goroutines per service.", v.orphans),
            (
                "goleash_control_service_leak_suspects",
                "Leak-suspect sites per service.",
                v.suspects,
            ),
        ):
            g = GaugeMetricFamily(name, doc, labels=["service"])
            for service in sorted(v.goroutines):
                g.add_metric([service], values.get(service, 0))
            yield g
        for name, doc, value in (
            ("goleash_control_batches", "Agent batches applied.", v.batches),
            ("goleash_control_batch_duplicates", "Agent batches ignored as resent.", v.duplicates),
            ("goleash_control_batch_gaps", "Agent batches that never arrived.", v.gaps),
            ("goleash_control_events", "Events written to the event log.", v.events),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield from policy_metrics(v)
        info = GaugeMetricFamily(
            "goleash_build_info", "goleash's version (always 1).", labels=["version"]
        )
        info.add_metric([goleash.__version__], 1.0)
        yield info


def policy_metrics(v: ControlView) -> Iterator[Metric]:
    """The policy engine's families (also what OTLP export sends)."""
    g = GaugeMetricFamily(
        "goleash_policy_level",
        "Current level of a rule for a service: 0 normal, N the rule's Nth level.",
        labels=["service", "rule"],
    )
    for (service, rule), level in sorted(v.levels.items()):
        g.add_metric([service, rule], level)
    yield g
    e = v.engine
    c = CounterMetricFamily(
        "goleash_policy_decisions",
        "Level changes decided (enforced, or recorded only in monitor mode).",
        labels=["rule", "direction", "mode"],
    )
    for (rule, direction, mode), n in sorted(e.decisions.items()):
        c.add_metric([rule, direction.lower(), mode.lower()], n)
    yield c
    for name, doc, counts in (
        ("goleash_policy_action_attempts", "Action attempts by action type and outcome.",
         e.attempts),
        ("goleash_policy_action_failures", "Failed action attempts by action type and outcome.",
         e.failures),
    ):  # fmt: skip
        c = CounterMetricFamily(name, doc, labels=["action", "outcome"])
        for (action, outcome), n in sorted(counts.items()):
            c.add_metric([action, outcome], n)
        yield c
    yield CounterMetricFamily(
        "goleash_policy_rule_errors",
        "Rule evaluations that failed (the rule held its level).",
        value=e.rule_errors,
    )
    h = HistogramMetricFamily(
        "goleash_policy_evaluation_seconds", "Duration of one policy evaluation round."
    )
    running, buckets = 0, []
    for le, n in zip(EVAL_BOUNDS_S, e.eval_buckets, strict=True):
        running += n
        buckets.append((repr(le), float(running)))
    buckets.append(("+Inf", float(e.evaluations)))
    h.add_metric([], buckets, sum_value=e.eval_sum_s)
    yield h


def control_registry(
    loop: asyncio.AbstractEventLoop, snapshot: Callable[[], ControlView]
) -> CollectorRegistry:
    """The control plane's metrics and its process metrics, collected from any thread
    (the numbers are computed on `loop`): what /metrics serves and OTLP sends."""

    async def on_loop() -> ControlView:
        return snapshot()

    def from_thread() -> ControlView:
        fut = asyncio.run_coroutine_threadsafe(on_loop(), loop)
        return fut.result(timeout=SCRAPE_TIMEOUT_S)

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(ControlCollector(from_thread))
    return registry


class MetricsServer:
    """`/metrics` over HTTP in a thread; the numbers come from `loop`'s thread."""

    def __init__(
        self, listen: str, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], ControlView]
    ) -> None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise MetricsListenError(f"--metrics-listen {listen!r}: expected HOST:PORT")

        self.registry = control_registry(loop, snapshot)
        try:
            self._server, _ = start_http_server(
                int(port), host.strip("[]") or "0.0.0.0", registry=self.registry
            )
        except OSError as exc:
            raise MetricsListenError(f"--metrics-listen {listen}: {exc.strerror or exc}") from exc
        self.address = f"{host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
