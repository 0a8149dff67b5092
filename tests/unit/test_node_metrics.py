"""The agent's /metrics by Prometheus' rules: process labels without pid, module-
relative go statements, a bounded number of site series, exact latency buckets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import goleash
from goleash.node.metrics import (
    LATENCY_BOUNDS_NS,
    AgentCollector,
    AgentView,
    FunctionView,
    ProcessView,
    SiteView,
    bounded_sites,
    trim_go_path,
)
from goleash.probes import hist


def _proc(pid: int, sites: list[SiteView], **kw: object) -> ProcessView:
    base = dict(
        pid=pid, service="shop/api", mode="probes", goroutines=sum(s.live for s in sites),
        sites=sites, probe_hits={"create_hits": 5}, dropped={}, namespace="shop",
        pod="api-7d9f", container="api", module="example.com/shop",
    )  # fmt: skip
    base.update(kw)
    return ProcessView(**base)  # type: ignore[arg-type]


def _scrape(view: AgentView, **kw: object) -> dict[str, list]:
    reg = CollectorRegistry()
    reg.register(AgentCollector(lambda: view, **kw))  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _view(*procs: ProcessView) -> AgentView:
    return AgentView(list(procs), 1, 1, 0, {}, 0, True, {}, 1)


def test_go_statements_lose_the_build_machine_paths() -> None:
    mod = "example.com/shop"
    assert trim_go_path("/home/ci/src/shop/handler/api.go:42", mod) == (
        "example.com/shop/handler/api.go:42"
    )
    assert trim_go_path("/usr/local/go/src/net/http/server.go:3285", mod) == (
        "net/http/server.go:3285"
    )
    assert trim_go_path("/root/go/pkg/mod/github.com/x/y@v1.2.3/z.go:7", mod) == (
        "github.com/x/y@v1.2.3/z.go:7"
    )
    assert trim_go_path("/src/repo/cmd/main.go:3", "github.com/o/repo/v2") == (
        "github.com/o/repo/v2/cmd/main.go:3"
    )
    assert trim_go_path("example.com/shop/api.go:9", mod) == "example.com/shop/api.go:9"
    assert trim_go_path("/opt/build/weird/file.go:1", "") == "weird/file.go:1"


def test_sites_beyond_the_top_n_sum_into_one_other_series() -> None:
    sites = [SiteView(f"main.f{i}", f"/b/shop/f.go:{i}", i, 10 * i, i, 0) for i in range(1, 31)]
    kept = bounded_sites(sites, 5)
    assert [s.function for s in kept] == ["main.f30", "main.f29", "main.f28", "main.f27",
                                          "main.f26", "other"]  # fmt: skip
    assert kept[-1].live == sum(range(1, 26)) and kept[-1].created == 10 * sum(range(1, 26))
    fams = _scrape(_view(_proc(1, sites)), top_sites=5)
    live = fams["goleash_goroutines_live"]
    assert len(live) == 6
    assert sum(s.value for s in live) == sum(range(1, 31))  # nothing lost


def test_series_carry_pod_labels_and_no_pid_unless_asked() -> None:
    a = _proc(101, [SiteView("main.w", "/b/shop/w.go:3", 4, 4, 0, 1)])
    b = _proc(202, [SiteView("main.w", "/b/shop/w.go:3", 6, 6, 0, 2)])
    fams = _scrape(_view(a, b))
    (live,) = fams["goleash_goroutines_live"]  # two processes, one label set: summed
    assert live.value == 10
    assert live.labels == {
        "service": "shop/api", "namespace": "shop", "pod": "api-7d9f", "container": "api",
        "function": "main.w", "go_statement": "example.com/shop/w.go:3",
    }  # fmt: skip
    (procs,) = fams["goleash_process_goroutines"]
    assert procs.value == 10 and "pid" not in procs.labels
    with_pid = _scrape(_view(a, b), pid_label=True)["goleash_goroutines_live"]
    assert sorted((s.labels["pid"], s.value) for s in with_pid) == [("101", 4), ("202", 6)]


def test_build_info_and_latency_buckets_every_octave() -> None:
    counts = [0] * hist.N_BUCKETS
    counts[hist.bucket_of(3000)] += 2  # 3 µs: in the (2.048, 4.096] µs bucket
    fn = FunctionView("main.h", counts, sum(counts), 6000)
    fams = _scrape(_view(_proc(1, [], functions=[fn])))
    (info,) = fams["goleash_build_info"]
    assert info.value == 1 and info.labels["version"] == goleash.__version__
    buckets = [s for s in fams["goleash_function_latency_seconds"] if s.name.endswith("_bucket")]
    assert len(buckets) == len(LATENCY_BOUNDS_NS) + 1
    les = [float(s.labels["le"]) for s in buckets[:-1]]
    assert all(b / a == 2 for a, b in zip(les, les[1:], strict=False))
    cumulative = {float(s.labels["le"]): s.value for s in buckets[:-1]}
    assert cumulative[2.048e-06] == 0 and cumulative[4.096e-06] == 2
