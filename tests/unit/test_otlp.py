"""OTLP export of the metrics /metrics serves, received by a real OTLP/gRPC metrics
service in the test (the collector's protocol, over a loopback socket): the same
names, labels and values as a Prometheus scrape, from the translation unit up to a
real `goleash control-plane --otlp-endpoint` process."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2 as ms,
)
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2_grpc as ms_grpc,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from goleash.node.metrics import (
    AgentCollector,
    AgentView,
    FunctionView,
    ProcessView,
    SiteView,
)
from goleash.otlp import OtlpExporter
from goleash.probes import hist
from polling import wait_for

BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]


class Receiver(ms_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.requests: queue.Queue[ms.ExportMetricsServiceRequest] = queue.Queue()

    def Export(self, request, context):  # noqa: N802 (the proto's name)
        self.requests.put(request)
        return ms.ExportMetricsServiceResponse()

    def metrics(self, timeout: float = 30.0) -> dict[str, object]:
        req = self.requests.get(timeout=timeout)
        return {
            m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rx = Receiver()
    ms_grpc.add_MetricsServiceServicer_to_server(rx, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield rx, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _attrs(point) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def test_otlp_carries_what_prometheus_scrapes(receiver: tuple[Receiver, str]) -> None:
    rx, endpoint = receiver
    counts = [0] * hist.N_BUCKETS
    counts[hist.bucket_of(3000)] = 5
    counts[hist.bucket_of(70_000)] = 2
    proc = ProcessView(
        pid=7, service="shop", mode="probes", goroutines=12,
        sites=[SiteView("main.leak", "/b/shop/x.go:9", 12, 40, 28, 3)],
        probe_hits={"create_hits": 40}, dropped={},
        functions=[FunctionView("main.h", counts, 7, 155_000)], module="example.com/shop",
    )  # fmt: skip
    view = AgentView([proc], 3, 3, 0, {}, 0, True, {}, 2)
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: view))
    exporter = OtlpExporter(endpoint, registry, service_name="goleash-agent", interval=3600)
    try:
        assert exporter.export_once()
    finally:
        exporter.stop()
    got = rx.metrics()
    scraped = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert set(got) == {n for n, f in scraped.items() if f.samples}  # same names
    created = got["goleash_goroutines_created"]
    assert created.sum.is_monotonic and created.sum.aggregation_temporality == 2  # cumulative
    (point,) = created.sum.data_points
    assert point.as_double == 40 and _attrs(point)["go_statement"] == "example.com/shop/x.go:9"
    assert "pid" not in _attrs(point)
    (live,) = got["goleash_goroutines_live"].gauge.data_points
    assert live.as_double == 12 and _attrs(live)["service"] == "shop"
    (h,) = got["goleash_function_latency_seconds"].histogram.data_points
    assert h.count == 7 and sum(h.bucket_counts) == 7
    assert len(h.explicit_bounds) == len(h.bucket_counts) - 1
    prom_buckets = [
        s for s in scraped["goleash_function_latency_seconds"].samples
        if s.name.endswith("_bucket")
    ]  # fmt: skip
    cumulative = 0
    for bound, n, s in zip(h.explicit_bounds, h.bucket_counts, prom_buckets, strict=False):
        cumulative += n
        assert float(s.labels["le"]) == bound and s.value == cumulative


def test_an_absent_collector_is_a_failed_export_not_a_crash() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: AgentView([], 0, 0, 0, {}, 0, False, {}, 0)))
    exporter = OtlpExporter(f"127.0.0.1:{port}", registry, service_name="t", interval=3600)
    exporter._exporter._timeout = 1  # no retries for minutes in a test
    try:
        assert exporter.export_once() is False and exporter.failures == 1
    finally:
        exporter.stop()


def test_control_plane_pushes_its_policy_metrics_over_otlp(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    rx, endpoint = receiver
    proc = subprocess.Popen(
        [*GOLEASH, "control-plane", "--listen", "127.0.0.1:0",
         "--db", str(tmp_path / "cp.db"), "--otlp-endpoint", endpoint,
         "--otlp-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        got = wait_for(
            lambda: (
                (m := rx.metrics(timeout=30)) and "goleash_policy_evaluation_seconds" in m and m
            ),
            "an OTLP export from the control plane",
            60,
        )
        assert "goleash_control_agents" in got and "goleash_build_info" in got
        states = {_attrs(p)["state"] for p in got["goleash_control_agents"].gauge.data_points}
        assert states == {"connected", "stale", "disconnected"}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


@pytest.mark.root
def test_agent_pushes_its_metrics_over_otlp(receiver: tuple[Receiver, str]) -> None:
    # No control plane and no process to follow: the agent buffers and still reports.
    rx, endpoint = receiver
    proc = subprocess.Popen(
        [*GOLEASH, "agent", "--server", "127.0.0.1:1", "--exe", "*/no-such-goleash-target",
         "--interval", "0.5", "--health-listen", "off", "--metrics-listen", "off",
         "--otlp-endpoint", endpoint, "--otlp-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def scanned() -> dict[str, object] | None:
            m = rx.metrics(timeout=60)
            scans = m.get("goleash_agent_scans")
            return m if scans and scans.sum.data_points[0].as_double >= 1 else None

        got = wait_for(scanned, "an OTLP export after the agent's first scan", 90)
        (connected,) = got["goleash_agent_connected"].gauge.data_points
        assert connected.as_double == 0  # nothing listens at the --server address
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
