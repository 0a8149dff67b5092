"""The agent's Prometheus `/metrics` and gRPC health endpoints.

Metrics are collected at scrape time from a consistent view of the agent (no
per-event bookkeeping on the hot path). Goroutine counters are the tracker's counts
since attach, which is what a Prometheus counter is (a restarted agent starts over;
`rate()` handles the reset). Per-site series carry `function` and `go_statement`;
the runtime's own goroutines are left out, as in the API.

Health (grpc.health.v1): service "" is liveness, SERVING while the agent runs.
"goleash.ready" is SERVING once (1) a trivial BPF program compiled and loaded on this
host, (2) the first scan of /proc is done, and (3) every selected process found so
far has been dealt with: probes attached, or reported as not traceable (not Go, too
old a Go, the probes refused). A host with no Go process yet is ready: readiness
says the agent can do its job, not that there is work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from goleash.errors import GoleashError
from goleash.probes import hist

READY_SERVICE = "goleash.ready"
# Prometheus buckets at every other power of two ns (1.024 µs .. 17.2 s): octave
# boundaries of the log-linear histograms, so each count is exact, not interpolated.
LATENCY_BOUNDS_NS = tuple(1 << k for k in range(10, 35, 2))


class ListenError(GoleashError):
    """An endpoint of the agent cannot listen where it was told to."""


@dataclass
class SiteView:
    function: str
    go_statement: str
    live: int
    created: int  # since attach
    exited: int
    orphans: int


@dataclass
class FunctionView:
    function: str
    buckets: list[int]  # log-linear counts since attach (probes/hist.py layout)
    count: int
    sum_ns: int


@dataclass
class ProcessView:
    pid: int
    service: str
    mode: str
    goroutines: int
    sites: list[SiteView]
    probe_hits: dict[str, int]
    dropped: dict[str, int]
    functions: list[FunctionView] = field(default_factory=list)
    panics: dict[str, int] = field(default_factory=dict)


@dataclass
class AgentView:
    processes: list[ProcessView]
    batches: int
    batches_sent: int
    buffered: int
    batch_drops: dict[str, int]
    reconnects: int
    connected: bool
    untraceable: dict[str, int]  # processes not traced, by reason kind
    scans: int
    process_errors: dict[str, int] = field(default_factory=dict)  # by stage, since start


def cumulative_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Log-linear bucket counts as Prometheus `le` buckets (seconds), +Inf last."""
    acc: list[float] = [0.0] * len(LATENCY_BOUNDS_NS)
    for i, c in enumerate(counts):
        if c:
            _lo, hi = hist.bucket_bounds(i)
            for j, le in enumerate(LATENCY_BOUNDS_NS):
                if hi <= le:
                    acc[j] += c
                    break
    out, running = [], 0.0
    for le, c in zip(LATENCY_BOUNDS_NS, acc, strict=True):
        running += c
        out.append((repr(le / 1e9), running))
    out.append(("+Inf", float(sum(counts))))
    return out


class AgentCollector(Collector):
    def __init__(self, view: Callable[[], AgentView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        v = self._view()
        site_labels = ["service", "pid", "function", "go_statement"]
        proc_labels = ["service", "pid"]
        live = GaugeMetricFamily(
            "goleash_goroutines_live", "Live goroutines per creation site.", labels=site_labels
        )
        created = CounterMetricFamily(
            "goleash_goroutines_created",
            "Goroutines created per creation site since the probes attached.",
            labels=site_labels,
        )
        exited = CounterMetricFamily(
            "goleash_goroutines_exited",
            "Goroutines that exited per creation site since the probes attached.",
            labels=site_labels,
        )
        orphans = GaugeMetricFamily(
            "goleash_goroutines_orphaned",
            "Live goroutines whose creator exited, parked where nothing will wake them.",
            labels=site_labels,
        )
        total = GaugeMetricFamily(
            "goleash_process_goroutines", "Live goroutines of a process.", labels=proc_labels
        )
        probes = GaugeMetricFamily(
            "goleash_process_probes_attached",
            "1 when uprobes trace the process, 0 when only its memory is read.",
            labels=proc_labels,
        )
        hits = CounterMetricFamily(
            "goleash_probe_hits",
            "Uprobe hits in a traced process, by probe.",
            labels=[*proc_labels, "probe"],
        )
        dropped = CounterMetricFamily(
            "goleash_probe_dropped_events",
            "Events the kernel side could not record (full tables, read faults).",
            labels=[*proc_labels, "reason"],
        )
        latency = HistogramMetricFamily(
            "goleash_function_latency_seconds",
            "Latency of traced functions (--func).",
            labels=[*proc_labels, "function"],
        )
        panics = CounterMetricFamily(
            "goleash_panics",
            "Panics (recovered or not) per function.",
            labels=[*proc_labels, "function"],
        )
        for p in v.processes:
            pl = [p.service, str(p.pid)]
            total.add_metric(pl, p.goroutines)
            probes.add_metric(pl, 1.0 if p.mode == "probes" else 0.0)
            for s in p.sites:
                sl = [*pl, s.function, s.go_statement]
                live.add_metric(sl, s.live)
                created.add_metric(sl, s.created)
                exited.add_metric(sl, s.exited)
                orphans.add_metric(sl, s.orphans)
            for name, n in sorted(p.probe_hits.items()):
                hits.add_metric([*pl, name.removesuffix("_hits")], n)
            for reason, n in sorted(p.dropped.items()):
                dropped.add_metric([*pl, reason], n)
            for f in p.functions:
                latency.add_metric(
                    [*pl, f.function], cumulative_buckets(f.buckets), sum_value=f.sum_ns / 1e9
                )
            for fn, n in sorted(p.panics.items()):
                panics.add_metric([*pl, fn], n)
        yield from (live, created, exited, orphans, total, probes, hits, dropped, latency, panics)

        yield GaugeMetricFamily(
            "goleash_agent_tracked_processes", "Go processes followed.", value=len(v.processes)
        )
        untraceable = GaugeMetricFamily(
            "goleash_agent_untraceable_processes",
            "Selected processes goleash cannot trace, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(v.untraceable.items()):
            untraceable.add_metric([reason], n)
        yield untraceable
        errors = CounterMetricFamily(
            "goleash_agent_process_errors",
            "Failures while handling one process (logged; that process only), by stage.",
            labels=["stage"],
        )
        for stage, n in sorted(v.process_errors.items()):
            errors.add_metric([stage], n)
        yield errors
        yield CounterMetricFamily(
            "goleash_agent_scans", "Scans of /proc for Go processes.", value=v.scans
        )
        yield CounterMetricFamily(
            "goleash_agent_batches",
            "Batches assembled (one per interval at least).",
            value=v.batches,
        )
        yield CounterMetricFamily(
            "goleash_agent_batches_sent",
            "Batches written to the ingest stream, resends included.",
            value=v.batches_sent,
        )
        yield GaugeMetricFamily(
            "goleash_agent_buffered_batches",
            "Batches held for the control plane (unsent, or sent too recently to be sure).",
            value=v.buffered,
        )
        drops = CounterMetricFamily(
            "goleash_agent_batches_dropped",
            "Batches that never reached the control plane, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(v.batch_drops.items()):
            drops.add_metric([reason], n)
        yield drops
        yield CounterMetricFamily(
            "goleash_agent_reconnects",
            "Ingest streams started again after one failed.",
            value=v.reconnects,
        )
        yield GaugeMetricFamily(
            "goleash_agent_connected",
            "1 while the channel to the control plane is up.",
            value=1.0 if v.connected else 0.0,
        )


def split_hostport(listen: str, what: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ListenError(f"{what} {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """`/metrics` over HTTP, with the agent's own process metrics (CPU, memory)."""

    def __init__(self, listen: str, view: Callable[[], AgentView]) -> None:
        host, port = split_hostport(listen, "--metrics-listen")
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(AgentCollector(view))
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ListenError(f"--metrics-listen {listen}: {exc.strerror or exc}") from exc
        self.address = f"{host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HealthServer:
    """grpc.health.v1: "" live, "goleash.ready" ready."""

    def __init__(self, listen: str) -> None:
        split_hostport(listen, "--health-listen")
        self.servicer = health.HealthServicer()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        try:
            port = self._server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise ListenError(f"--health-listen {listen}: cannot listen there ({exc})") from exc
        self.address = f"{listen.rpartition(':')[0]}:{port}"
        self.ready = False
        self.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.servicer.set(READY_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.start()

    def set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            status = health_pb2.HealthCheckResponse
            self.servicer.set(READY_SERVICE, status.SERVING if ready else status.NOT_SERVING)

    def stop(self) -> None:
        self.servicer.enter_graceful_shutdown()
        self._server.stop(1.0)
