"""OTLP export of the same metrics /metrics serves (optional: `pip install
'goleash[otlp]'`), so a fleet can push to an OpenTelemetry Collector and on to
Prometheus, Mimir or any OTLP backend.

One source of truth: the Prometheus registry the agent or control plane already
builds is collected every interval and translated family by family -- counters to
cumulative monotonic Sums (the `_total` suffix dropped, as OTel names them),
gauges to Gauges, histograms to explicit-bucket Histograms with the same bounds --
then sent with the OpenTelemetry SDK's OTLP/gRPC exporter. Nothing is measured
twice and the names stay the ones the dashboard and alerts use.

Export failures are logged and counted, never fatal: the collector being away must
not stop the agent (the next interval sends the cumulative values again).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

import goleash
from goleash.errors import GoleashError

log = logging.getLogger("goleash.otlp")
DEFAULT_INTERVAL_S = 30.0


class OtlpUnavailable(GoleashError):
    """--otlp-endpoint was given but the OpenTelemetry packages are not installed."""


_EXPORT_NAMES = (
    "AggregationTemporality", "Gauge", "Histogram", "HistogramDataPoint", "Metric",
    "MetricExportResult", "MetricsData", "NumberDataPoint", "ResourceMetrics", "ScopeMetrics",
    "Sum",
)  # fmt: skip


def _sdk() -> dict[str, Any]:
    """The OpenTelemetry classes used here, imported only when OTLP is asked for."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc import metric_exporter
        from opentelemetry.sdk import resources
        from opentelemetry.sdk.metrics import export
        from opentelemetry.sdk.util import instrumentation
    except ImportError as exc:
        raise OtlpUnavailable(
            f"--otlp-endpoint needs the OpenTelemetry SDK ({exc.name} is missing): "
            "pip install 'goleash[otlp]'"
        ) from None
    out = {name: getattr(export, name) for name in _EXPORT_NAMES}
    out["OTLPMetricExporter"] = metric_exporter.OTLPMetricExporter
    out["Resource"] = resources.Resource
    out["InstrumentationScope"] = instrumentation.InstrumentationScope
    return out


def metrics_data(
    registry: CollectorRegistry, resource_attrs: dict[str, str], start_ns: int, now_ns: int
) -> Any:
    """The registry's current values as an OTLP MetricsData."""
    sdk = _sdk()
    cumulative = sdk["AggregationTemporality"].CUMULATIVE
    metrics = []
    for fam in registry.collect():
        if fam.type in ("counter", "gauge"):
            points = [
                sdk["NumberDataPoint"](dict(s.labels), start_ns, now_ns, float(s.value))
                for s in fam.samples
                if s.name in (fam.name, fam.name + "_total") and math.isfinite(s.value)
            ]
            if not points:
                continue
            if fam.type == "counter":
                data = sdk["Sum"](points, cumulative, True)
            else:
                data = sdk["Gauge"](points)
            metrics.append(sdk["Metric"](fam.name, fam.documentation, "", data))
        elif fam.type == "histogram":
            points = _histogram_points(sdk, fam, start_ns, now_ns)
            if points:
                data = sdk["Histogram"](points, cumulative)
                metrics.append(sdk["Metric"](fam.name, fam.documentation, "s", data))
    scope = sdk["InstrumentationScope"]("goleash", goleash.__version__)
    resource = sdk["Resource"].create(resource_attrs)
    return sdk["MetricsData"](
        [sdk["ResourceMetrics"](resource, [sdk["ScopeMetrics"](scope, metrics, "")], "")]
    )


def _histogram_points(sdk: Any, fam: Any, start_ns: int, now_ns: int) -> list[Any]:
    # Prometheus buckets are cumulative per label set; OTLP wants per-bucket counts.
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in fam.samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        key = tuple(sorted(labels.items()))
        entry = series.setdefault(key, {"labels": labels, "buckets": [], "sum": 0.0})
        if s.name.endswith("_bucket"):
            entry["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            entry["sum"] = s.value
    points = []
    for entry in series.values():
        buckets = sorted(entry["buckets"])
        if not buckets:
            continue
        bounds = [le for le, _ in buckets if math.isfinite(le)]
        counts, prev = [], 0.0
        for _le, c in buckets:
            counts.append(int(max(0.0, c - prev)))
            prev = c
        total = int(buckets[-1][1])
        # Prometheus keeps no min/max: the edges of the outermost non-empty buckets
        # bound them.
        nonempty = [i for i, c in enumerate(counts) if c]
        lo = ([0.0, *bounds][nonempty[0]]) if nonempty else 0.0
        hi = (
            (bounds[nonempty[-1]] if nonempty[-1] < len(bounds) else bounds[-1])
            if nonempty
            else 0.0
        )
        points.append(
            sdk["HistogramDataPoint"](
                entry["labels"], start_ns, now_ns, total, entry["sum"], counts, bounds, lo, hi
            )
        )
    return points


class OtlpExporter:
    """Pushes `registry` to an OTLP/gRPC endpoint every `interval` seconds."""

    def __init__(
        self,
        endpoint: str,
        registry: CollectorRegistry,
        *,
        service_name: str,
        interval: float = DEFAULT_INTERVAL_S,
        insecure: bool = True,
        resource: dict[str, str] | None = None,
    ) -> None:
        sdk = _sdk()
        self._ok = sdk["MetricExportResult"].SUCCESS
        self._exporter = sdk["OTLPMetricExporter"](endpoint=endpoint, insecure=insecure)
        self.registry = registry
        self.interval = interval
        self.resource = {"service.name": service_name, "service.version": goleash.__version__}
        self.resource |= resource or {}
        self.start_ns = time.time_ns()
        self.exports = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)

    def export_once(self) -> bool:
        data = metrics_data(self.registry, self.resource, self.start_ns, time.time_ns())
        try:
            ok = self._exporter.export(data, timeout_millis=10_000) == self._ok
        except Exception:  # the collector's problems are never the agent's
            log.exception("OTLP export failed")
            ok = False
        self.exports += 1
        if not ok:
            self.failures += 1
            log.warning("OTLP export %d failed (%d so far); retrying next interval",
                        self.exports, self.failures)  # fmt: skip
        return ok

    def start(self) -> OtlpExporter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.export_once()

    def stop(self) -> None:
        """A last export (the final counts), then shut the exporter down."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=self.interval + 15)
            self.export_once()
        self._exporter.shutdown()
