"""The agent's Prometheus `/metrics` and gRPC health endpoints.

Metrics are collected at scrape time from a consistent view of the agent (no
per-event bookkeeping on the hot path). Goroutine counters are the tracker's counts
since attach, which is what a Prometheus counter is (a restarted agent starts over;
`rate()` handles the reset). Per-site series carry `function` and `go_statement`;
the runtime's own goroutines are left out, as in the API.

Labels follow Prometheus' rules for exporters: a process is named by `service`,
`namespace`, `pod`, `container` (stable across restarts), not by its pid (a new
series at every restart); `--metrics-pid-label` adds `pid` for hosts that run several
copies of one executable and want them apart (without it, their series are summed).
`go_statement` is module-relative (`example.com/shop/handler.go:42`, `net/http/
server.go:3285`), not the build machine's path. Sites are bounded: the top N per
process by live goroutines (`--metrics-top-sites`), the rest summed into one series
with function and go_statement "other".

Health (grpc.health.v1): service "" is liveness, SERVING while the agent runs.
"goleash.ready" is SERVING once (1) a trivial BPF program compiled and loaded on this
host, (2) the first scan of /proc is done, and (3) every selected process found so
far has been dealt with: probes attached, or reported as not traceable (not Go, too
old a Go, the probes refused). A host with no Go process yet is ready: readiness
says the agent can do its job, not that there is work.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
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

import goleash
from goleash.errors import GoleashError
from goleash.node import DEFAULT_TOP_SITES  # noqa: F401  (defined there for the CLI)
from goleash.probes import hist

READY_SERVICE = "goleash.ready"
# Prometheus buckets at every power of two ns (1.024 µs .. 17.2 s), 2x apart: octave
# boundaries of the log-linear histograms, so each count is exact, not interpolated.
LATENCY_BOUNDS_NS = tuple(1 << k for k in range(10, 35))

OTHER = "other"
PROCESS_LABELS = ("service", "namespace", "pod", "container")


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
    # Log-linear counts since attach (probes/hist.py layout), each interval's timed
    # calls weighted to stand for all its calls when timing was sampled.
    buckets: list[float]
    count: float  # every call
    sum_ns: float
    timed: int = 0  # calls really timed


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
    namespace: str = ""
    pod: str = ""
    container: str = ""
    module: str = ""  # main module path from the build info, for trimming paths


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


def trim_go_path(where: str, module: str = "") -> str:
    """A `go` statement's "file:line" as a path a reader knows, without the build
    machine's directories: module cache paths from the module (`github.com/x/y@v1/
    f.go`), the main module's files from its module path, the standard library from
    GOROOT/src; else the last directory and the file."""
    path, sep, line = where.rpartition(":")
    if not sep or not line.isdigit():
        path, line = where, ""
    if not path.startswith("/"):
        return where  # already relative (-trimpath builds, "?")
    # the main module's directory is usually named after its last path element
    # (github.com/org/repo/v2 lives in .../repo)
    parts = [p for p in module.split("/") if p and not re.fullmatch(r"v\d+", p)]
    root = f"/{parts[-1]}/" if parts else ""
    if "/pkg/mod/" in path:
        out = path.rsplit("/pkg/mod/", 1)[1]
    elif root and root in path:
        out = module + "/" + path.rsplit(root, 1)[1]
    elif "/src/" in path:
        out = path.rsplit("/src/", 1)[1]
    else:
        out = "/".join(path.rsplit("/", 2)[-2:])
    return f"{out}:{line}" if line else out


def bounded_sites(sites: list[SiteView], top: int) -> list[SiteView]:
    """The `top` sites with the most live goroutines (then most created), and one
    "other" site summing the rest, so a process cannot flood Prometheus with series."""
    if len(sites) <= top:
        return sites
    ranked = sorted(sites, key=lambda s: (-s.live, -s.created, s.function, s.go_statement))
    rest = SiteView(OTHER, OTHER, 0, 0, 0, 0)
    for s in ranked[top:]:
        rest.live += s.live
        rest.created += s.created
        rest.exited += s.exited
        rest.orphans += s.orphans
    return [*ranked[:top], rest]


def cumulative_buckets(
    counts: Sequence[float], total: float | None = None
) -> list[tuple[str, float]]:
    """Log-linear bucket counts as Prometheus `le` buckets (seconds), +Inf last: `total`
    (every call, so that `_count` means all calls), else the sum of the counts."""
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
    out.append(("+Inf", float(sum(counts) if total is None else max(total, running))))
    return out


class _Sums:
    """Values of one metric family keyed by label values: processes that share their
    labels (no pid label) are summed, never emitted twice."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + value

    def fill(self, family: _Summed) -> None:
        for labels, value in sorted(self.values.items()):
            family.add_metric(list(labels), value)


class AgentCollector(Collector):
    def __init__(
        self,
        view: Callable[[], AgentView],
        *,
        top_sites: int = DEFAULT_TOP_SITES,
        pid_label: bool = False,
    ) -> None:
        self._view = view
        self._top_sites = max(0, top_sites)
        self._pid_label = pid_label

    def _process_labels(self, p: ProcessView) -> tuple[str, ...]:
        base = (p.service, p.namespace, p.pod, p.container)
        return (*base, str(p.pid)) if self._pid_label else base

    def collect(self) -> Iterator[Metric]:
        v = self._view()
        yield _build_info()
        yield from self._per_process(v.processes)
        yield from _agent_metrics(v)

    def _per_process(self, processes: Sequence[ProcessView]) -> Iterator[Metric]:
        """The series labelled by process: goroutines per site, probes, latency, panics."""
        proc_labels = [*PROCESS_LABELS, *(["pid"] if self._pid_label else [])]
        summed, latency, timed = _process_families(proc_labels)
        sums = {name: _Sums() for name in _SUMMED}
        hists: dict[tuple[str, ...], _Hist] = {}
        for p in processes:
            self._add_process(p, sums, hists)
        for name in _SUMMED:
            sums[name].fill(summed[name])
        for fkey, (buckets, sum_ns, calls, n_timed) in sorted(hists.items()):
            latency.add_metric(
                list(fkey), cumulative_buckets(buckets, calls), sum_value=sum_ns / 1e9
            )
            timed.add_metric(list(fkey), n_timed)
        yield from (summed[name] for name in _SUMMED if name != "panics")
        yield from (latency, summed["panics"], timed)

    def _add_process(
        self, p: ProcessView, sums: dict[str, _Sums], hists: dict[tuple[str, ...], _Hist]
    ) -> None:
        pl = self._process_labels(p)
        sums["total"].add(pl, p.goroutines)
        sums["probes"].add(pl, 1.0 if p.mode == "probes" else 0.0)
        trimmed: dict[tuple[str, str], SiteView] = {}
        for s in p.sites:
            key = (s.function, trim_go_path(s.go_statement, p.module))
            t = trimmed.setdefault(key, SiteView(*key, 0, 0, 0, 0))
            t.live, t.created = t.live + s.live, t.created + s.created
            t.exited, t.orphans = t.exited + s.exited, t.orphans + s.orphans
        for s in bounded_sites(list(trimmed.values()), self._top_sites):
            sl = (*pl, s.function, s.go_statement)
            sums["live"].add(sl, s.live)
            sums["created"].add(sl, s.created)
            sums["exited"].add(sl, s.exited)
            sums["orphans"].add(sl, s.orphans)
        for name, n in p.probe_hits.items():
            sums["hits"].add((*pl, name.removesuffix("_hits")), n)
        for reason, n in p.dropped.items():
            sums["dropped"].add((*pl, reason), n)
        for f in p.functions:
            fkey = (*pl, f.function)
            buckets, sum_ns, calls, n_timed = hists.get(fkey, ([0.0] * len(f.buckets), 0, 0, 0))
            if len(buckets) < len(f.buckets):
                buckets += [0.0] * (len(f.buckets) - len(buckets))
            for i, c in enumerate(f.buckets):
                buckets[i] += c
            hists[fkey] = (buckets, sum_ns + f.sum_ns, calls + f.count, n_timed + f.timed)
        for fn, n in p.panics.items():
            sums["panics"].add((*pl, fn), n)


# (bucket counts, sum ns, calls, timed calls) of one function's histogram
_Hist = tuple[list[float], float, float, float]
_Summed = GaugeMetricFamily | CounterMetricFamily
# families summed over processes that share their labels
_SUMMED = ("live", "created", "exited", "orphans", "total", "probes", "hits", "dropped", "panics")


def _process_families(
    proc_labels: list[str],
) -> tuple[dict[str, _Summed], HistogramMetricFamily, CounterMetricFamily]:
    """The empty families: those summed by label (keyed as in _SUMMED), latency, timed."""
    site_labels = [*proc_labels, "function", "go_statement"]
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
        "Processes whose goroutines uprobes trace (the others: memory reads only).",
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
    timed = CounterMetricFamily(
        "goleash_function_timed_calls",
        "Calls of traced functions actually timed (fewer than the latency histogram's "
        "_count, which is every call, when timing is sampled to fit the budget).",
        labels=[*proc_labels, "function"],
    )
    panics = CounterMetricFamily(
        "goleash_panics",
        "Panics (recovered or not) per function.",
        labels=[*proc_labels, "function"],
    )
    summed: dict[str, _Summed] = {
        **{"live": live, "created": created, "exited": exited, "orphans": orphans},
        **{"total": total, "probes": probes, "hits": hits, "dropped": dropped},
        "panics": panics,
    }
    return summed, latency, timed


def _agent_metrics(v: AgentView) -> Iterator[Metric]:
    """The agent's own series: processes followed, failures, batches, the channel."""
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


def _build_info() -> GaugeMetricFamily:
    """goleash_build_info{version, python} 1: the exporters' convention, so dashboards
    can show and join on what runs."""
    import platform

    info = GaugeMetricFamily(
        "goleash_build_info",
        "goleash's version and the Python it runs on (always 1).",
        labels=["version", "python"],
    )
    info.add_metric([goleash.__version__, platform.python_version()], 1.0)
    return info


def split_hostport(listen: str, what: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ListenError(f"{what} {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


def agent_registry(
    view: Callable[[], AgentView], *, top_sites: int = DEFAULT_TOP_SITES, pid_label: bool = False
) -> CollectorRegistry:
    """The agent's metrics with its own process metrics (CPU, memory): what /metrics
    serves and OTLP export sends."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(AgentCollector(view, top_sites=top_sites, pid_label=pid_label))
    return registry


class MetricsServer:
    """`/metrics` over HTTP, with the agent's own process metrics (CPU, memory)."""

    def __init__(
        self,
        listen: str,
        view: Callable[[], AgentView],
        *,
        top_sites: int = DEFAULT_TOP_SITES,
        pid_label: bool = False,
    ) -> None:
        host, port = split_hostport(listen, "--metrics-listen")
        self.registry = agent_registry(view, top_sites=top_sites, pid_label=pid_label)
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
