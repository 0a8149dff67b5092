"""Control-plane ingest under simulated agents (issue "The data path", benchmark).

A real `goleash control-plane` process is fed by 1000 simulated agents x 20 Go
processes each, every agent sending one batch per 5 s interval on its own ingest
stream (spread evenly over the interval, as independent agents would), for a few
intervals. Meanwhile a client asks ListOrphans and GetFunctionLatency over and over.
Reported: what the control plane costs (CPU share of one core, CPU per 1000 process
snapshots, resident memory), whether it keeps up (batches applied vs sent, how late
agents could send), and the query latencies while it ingests.

The agents run in a child process (asyncio, pre-serialised batches: protobuf messages
concatenate by merging, so a per-interval header with the sequence number is glued to
a per-agent body built once), so the query client and the control plane are not
slowed down by the load generator's Python. Authentication is on, as in a cluster:
every stream carries the agents' shared token, every query a viewer's (each call is
checked against the role table). Sizes: GOLEASH_BENCH_INGEST_AGENTS,
_PROCESSES, _INTERVALS, _INTERVAL_S override the defaults for quick runs.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from goleash.bench import Report

AGENTS = int(os.environ.get("GOLEASH_BENCH_INGEST_AGENTS", "1000"))
PROCESSES = int(os.environ.get("GOLEASH_BENCH_INGEST_PROCESSES", "20"))
INTERVALS = int(os.environ.get("GOLEASH_BENCH_INGEST_INTERVALS", "9"))  # the first warms up
INTERVAL_S = float(os.environ.get("GOLEASH_BENCH_INGEST_INTERVAL_S", "5"))
SERVICES = 50
CHANNELS = 8
SITES = 6
ORPHAN_SHARE = 10  # every 10th process has an orphaned site
TRACED = ("net/http.(*http2Framer).ReadFrame", "main.callBackend")
QUERY_PERIOD_S = 0.05
AGENT_TOKEN = "bench-agent-" + "a" * 32
VIEWER_TOKEN = "bench-viewer-" + "v" * 32


@dataclass
class AgentRun:
    sent: int
    accepted: int
    errors: int
    why: str  # failed streams by status code
    lateness_p99: float
    bytes_per_batch: float
    build_s: float


def _service(agent: int, proc: int) -> str:
    return f"svc-{(agent * PROCESSES + proc) % SERVICES:02d}"


def _bodies(agent: int) -> tuple[bytes, bytes]:
    """(announcement, snapshots) of one agent, each a serialised StreamBatchesRequest."""
    from goleash.api.goleash.v1 import ingest_service_pb2 as ing
    from goleash.api.goleash.v1 import types_pb2 as t

    announce = ing.StreamBatchesRequest()
    body = ing.StreamBatchesRequest()
    for i in range(PROCESSES):
        pid = 1000 + i
        service = _service(agent, i)
        announce.batch.processes_appeared.add(
            pid=pid,
            start_time_unix_nano=pid * 1_000_003,
            exe=f"/usr/local/bin/{service}",
            service=service,
            go_version="go1.22.10",
            tracking_mode=t.TRACKING_MODE_PROBES,
        )
        s = body.batch.snapshots.add(pid=pid)
        for k in range(SITES):
            st = s.sites.add(
                function=f"main.{service.replace('-', '')}.worker{k}",
                go_statement=f"/src/{service}/main.go:{40 + k}",
                creator_function="main.main",
                live=10 + k * 7 + agent % 5,
                created=3 + k,
                exited=3 + k,
            )
            st.age.p50_seconds, st.age.p99_seconds, st.age.max_seconds = 2.0, 40.0, 60.0 + k
            st.wait_reasons.add(reason="chan receive", count=5)
            st.wait_reasons.add(reason="select", count=3)
            if k == 0 and i % ORPHAN_SHARE == 0:
                st.orphans.count = 4
                st.orphans.oldest_age_seconds = 120.0 + agent % 60
                st.orphans.dominant_wait_reason = "chan receive"
        s.goroutines = sum(x.live for x in s.sites)
        for g in range(3):
            gr = s.goroutines_kept.add(
                goid=100 + g,
                parent_goid=1,
                function=s.sites[0].function,
                go_statement=s.sites[0].go_statement,
                state=t.GOROUTINE_STATE_WAITING,
                wait_reason="chan receive",
                age_seconds=120.0 - g,
                blocked_for_seconds=119.0 - g,
                orphan=i % ORPHAN_SHARE == 0,
            )
            for f in range(6):
                gr.stack.add(function=f"main.frame{f}", file="/src/main.go", line=10 + f)
        for fn in TRACED:
            lat = s.latency.add(function=fn)
            h = lat.histogram
            h.sub_bucket_bits = 3
            for b in range(8):  # ~1 ms .. 4 ms
                h.buckets.add(index=150 + 2 * b + agent % 3, count=20 - 2 * b)
            h.count = sum(b.count for b in h.buckets)
            h.sum_seconds = h.count * 0.002
    return announce.SerializeToString(), body.SerializeToString()


async def _agents(address: str, t0: float) -> AgentRun:
    import grpc

    from goleash.api.goleash.v1 import ingest_service_pb2 as ing
    from goleash.api.goleash.v1 import types_pb2 as t

    built = time.monotonic()
    bodies = [_bodies(a) for a in range(AGENTS)]
    build_s = time.monotonic() - built
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    calls = [
        ch.stream_unary(
            "/goleash.v1.IngestService/StreamBatches",
            request_serializer=None,  # we send bytes we serialised ourselves
            response_deserializer=ing.StreamBatchesResponse.FromString,
        )
        for ch in channels
    ]
    loop = asyncio.get_running_loop()
    start = loop.time() + max(t0 - time.time(), 0.0)
    lateness: list[float] = []
    sent = [0]
    sizes: list[int] = []

    codes: dict[str, int] = {}

    async def one(agent: int) -> tuple[int, bool]:
        announce, body = bodies[agent]
        identity = t.AgentIdentity(
            agent_id=f"agent-{agent:04d}", node_name=f"node-{agent:04d}", instance_id="bench"
        )

        async def batches() -> Any:
            for k in range(INTERVALS):
                due = start + k * INTERVAL_S + agent * INTERVAL_S / AGENTS
                await asyncio.sleep(max(due - loop.time(), 0.0))
                lateness.append(loop.time() - due)
                head = ing.StreamBatchesRequest()
                head.batch.agent.CopyFrom(identity)
                head.batch.sequence = k + 1
                head.batch.heartbeat.interval_seconds = INTERVAL_S
                head.batch.heartbeat.tracked_processes = PROCESSES
                msg = head.SerializeToString() + (announce if k == 0 else b"") + body
                if agent == 0:
                    sizes.append(len(msg))
                sent[0] += 1
                yield msg

        try:
            resp = await calls[agent % CHANNELS](
                batches(), metadata=(("authorization", f"Bearer {AGENT_TOKEN}"),)
            )
            return resp.accepted, True
        except grpc.RpcError as exc:
            name = exc.code().name  # type: ignore[attr-defined]
            codes[name] = codes.get(name, 0) + 1
            return 0, False

    results = await asyncio.gather(*(one(a) for a in range(AGENTS)))
    for ch in channels:
        await ch.close()
    lateness.sort()
    return AgentRun(
        sent=sent[0],
        accepted=sum(r[0] for r in results),
        errors=sum(1 for r in results if not r[1]),
        why=", ".join(f"{n} {k}" for k, n in sorted(codes.items())),
        lateness_p99=lateness[int(0.99 * (len(lateness) - 1))] if lateness else 0.0,
        bytes_per_batch=statistics.mean(sizes) if sizes else 0.0,
        build_s=build_s,
    )


def _agents_process(address: str, t0: float, out: Any) -> None:
    out.send(asyncio.run(_agents(address, t0)))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _start_control_plane(db: Path) -> tuple[subprocess.Popen[str], str]:
    (db.parent / "agent.token").write_text(AGENT_TOKEN + "\n")
    (db.parent / "viewer.token").write_text(VIEWER_TOKEN + "\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "goleash.cli",
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(db),
            "--agent-token-file",
            str(db.parent / "agent.token"),
            "--viewer-token-file",
            str(db.parent / "viewer.token"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on " in line:
            address = line.split("listening on ", 1)[1].split()[0]
            threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()  # type: ignore[union-attr]
            return proc, address
        if not line:
            break
    proc.kill()
    raise RuntimeError("goleash control-plane did not start")


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(int(p * len(s)), len(s) - 1)] if s else 0.0


class _Viewer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends the viewer's token with every query."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        md = (*(details.metadata or ()), ("authorization", f"Bearer {VIEWER_TOKEN}"))
        return continuation(details._replace(metadata=md), request)


@dataclass
class _Window:
    """What the query client saw while the agents ingested at full rate."""

    lat_orphans: list[float] = field(default_factory=list)  # seconds per call
    lat_service: list[float] = field(default_factory=list)
    lat_all: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # control plane CPU over the window
    wall_s: float = 0.0
    applied: int = 0  # batches the control plane applied over the window
    groups: int = 0  # orphan groups at the end


def run(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="goleash-bench-ingest-") as tmp:
        cp, address = _start_control_plane(Path(tmp) / "goleash.db")
        try:
            # agents start together after they have built their batches (a few seconds)
            t0 = time.time() + 6.0
            recv, send = mp.get_context("spawn").Pipe(duplex=False)
            agents = mp.get_context("spawn").Process(
                target=_agents_process, args=(address, t0, send), daemon=True
            )
            agents.start()
            w = _query_while_ingesting(
                address,
                cp.pid,
                steady_from=t0 + INTERVAL_S,  # after every agent announced its processes
                end=t0 + INTERVALS * INTERVAL_S,
            )
            run_ = recv.recv() if recv.poll(120) else None
            agents.join(timeout=30)
            rss = _status_kb(cp.pid, "VmRSS") / 1024
            peak = _status_kb(cp.pid, "VmHWM") / 1024
        finally:
            cp.terminate()
            cp.wait(timeout=30)
    _report(report, w, run_, rss=rss, peak=peak)


def _query_while_ingesting(address: str, cp_pid: int, *, steady_from: float, end: float) -> _Window:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc

    w = _Window()
    with grpc.insecure_channel(address) as plain:
        ch = grpc.intercept_channel(plain, _Viewer())
        api = q_grpc.GoleashServiceStub(ch)
        while time.time() < steady_from:
            time.sleep(0.05)
        cpu0, cpu_t0 = _cpu_seconds(cp_pid), time.monotonic()
        applied0 = sum(a.batches for a in api.ListAgents(q.ListAgentsRequest()).agents)
        k = 0
        while time.time() < end:
            k += 1
            one_service = q.ProcessSelector(service=_service(0, k))
            for sink, method, request in (
                (w.lat_orphans, api.ListOrphans, q.ListOrphansRequest()),
                (
                    w.lat_service,
                    api.GetFunctionLatency,
                    q.GetFunctionLatencyRequest(function=TRACED[0], selector=one_service),
                ),
                (
                    w.lat_all,
                    api.GetFunctionLatency,
                    q.GetFunctionLatencyRequest(function=TRACED[0]),
                ),
            ):
                began = time.perf_counter()
                method(request)
                sink.append(time.perf_counter() - began)
            time.sleep(QUERY_PERIOD_S)
        w.cpu_s, w.wall_s = _cpu_seconds(cp_pid) - cpu0, time.monotonic() - cpu_t0
        applied1 = sum(a.batches for a in api.ListAgents(q.ListAgentsRequest()).agents)
        w.applied = applied1 - applied0
        w.groups = len(api.ListOrphans(q.ListOrphansRequest()).groups)
    return w


def _report(report: Report, w: _Window, run_: AgentRun | None, *, rss: float, peak: float) -> None:
    wall = w.wall_s
    snapshots = w.applied * PROCESSES
    shape = f"{AGENTS} agents x {PROCESSES} processes, {INTERVAL_S:g} s interval"
    report.line("simulated agents", AGENTS, "agents", shape)
    report.line(
        "process snapshots ingested",
        snapshots / wall,
        "per s",
        f"needed {AGENTS * PROCESSES / INTERVAL_S:,.0f}/s",
    )
    if run_ is not None:
        report.line(
            "batches applied / sent",
            run_.accepted / max(run_.sent, 1),
            "ratio",
            f"{run_.accepted} of {run_.sent}, {run_.errors} streams failed"
            + (f" ({run_.why})" if run_.why else ""),
        )
        report.line(
            "agent send lateness p99",
            run_.lateness_p99 * 1000,
            "ms",
            "how late agents could send (backpressure)",
        )
        report.line("batch size", run_.bytes_per_batch / 1024, "KiB", f"{PROCESSES} processes")
    report.line("control plane CPU while ingesting", w.cpu_s / wall * 100, "% of a core")
    report.line("control plane CPU per 1000 snapshots", w.cpu_s / max(snapshots, 1) * 1e6, "ms")
    report.line("control plane RSS", rss, "MiB", f"peak {peak:.0f} MiB")
    report.line(
        "ListOrphans p50 while ingesting",
        _pct(w.lat_orphans, 0.5) * 1000,
        "ms",
        f"{w.groups} groups",
    )
    report.line(
        "ListOrphans p99 while ingesting",
        _pct(w.lat_orphans, 0.99) * 1000,
        "ms",
        f"{len(w.lat_orphans)} calls",
    )
    report.line(
        "GetFunctionLatency p99, one service",
        _pct(w.lat_service, 0.99) * 1000,
        "ms",
        f"p50 {_pct(w.lat_service, 0.5) * 1000:.1f} ms",
    )
    report.line(
        "GetFunctionLatency p99, all services",
        _pct(w.lat_all, 0.99) * 1000,
        "ms",
        f"p50 {_pct(w.lat_all, 0.5) * 1000:.1f} ms",
    )


if __name__ == "__main__":
    run(Report())
