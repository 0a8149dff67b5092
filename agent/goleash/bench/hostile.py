"""Memory ceiling: the control plane's RSS under a fleet plus a hostile agent (issue 11).

A real `goleash control-plane` process ingests the ingest benchmark's simulated fleet
(bench/ingest.py's agents, in a child process) while one hostile client, for
HOSTILE_S seconds, sends what used to exhaust it: 6.7 MB batches of 300k sites,
4 MB agent ids, batches over the per-agent caps, and agents that fill their caps
with fresh ids one after another (the legal worst case). Reported: RSS before the
attack, its peak and end, the caps that bound it, how many hostile requests were
refused, whether the fleet kept being applied, and the longest query while it ran
(a stalled event loop shows there).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from goleash.bench import Report

if TYPE_CHECKING:
    from goleash.bench.ingest import AgentRun

HOSTILE_S = float(os.environ.get("GOLEASH_BENCH_HOSTILE_S", "60"))
WARMUP_S = 10.0  # the fleet alone first: its RSS is the baseline


def _hostile_payloads() -> list[tuple[str, bytes]]:
    """Serialised StreamBatchesRequest messages, built once (the attack must not be
    slowed by the attacker's Python)."""
    from goleash.api.goleash.v1 import ingest_service_pb2 as ing

    out = []
    flood = ing.StreamBatchesRequest()
    flood.batch.agent.agent_id = "flood"
    flood.batch.sequence = 1
    flood.batch.processes_appeared.add(pid=7, service="flood")
    snap = flood.batch.snapshots.add(pid=7, goroutines=300_000)
    for i in range(300_000):
        snap.sites.add(function=f"f{i}", go_statement=f"a:{i}", live=1)
    out.append(("300k sites", flood.SerializeToString()))
    big = ing.StreamBatchesRequest()
    big.batch.agent.agent_id = "a" * (4 << 20)
    big.batch.sequence = 1
    out.append(("4 MB agent id", big.SerializeToString()))
    procs = ing.StreamBatchesRequest()
    procs.batch.agent.agent_id = "procs"
    procs.batch.sequence = 1
    for pid in range(1, 2002):
        procs.batch.processes_appeared.add(pid=pid, service="procs")
    out.append(("2001 processes", procs.SerializeToString()))
    return out


def _filler(agent_id: str, sites: int) -> bytes:
    """A batch within every cap: `sites` sites (the per-agent cap) in processes of 4000."""
    from goleash.api.goleash.v1 import ingest_service_pb2 as ing

    m = ing.StreamBatchesRequest()
    m.batch.agent.agent_id = agent_id
    m.batch.sequence = 1
    per = 4000  # under the per-process cap
    for p in range(math.ceil(sites / per)):
        n = min(per, sites - p * per)
        m.batch.processes_appeared.add(pid=p + 1, service=f"fill-{p}")
        s = m.batch.snapshots.add(pid=p + 1, goroutines=n)
        for i in range(n):
            s.sites.add(function=f"{agent_id}.f{p}_{i}", go_statement=f"f.go:{i}", live=1)
    return m.SerializeToString()


def _attack(
    address: str,
    payloads: list[tuple[str, bytes]],
    filler: bytes,
    fill_from: float,
    until: float,
    out: dict[str, Any],
) -> None:
    """Refused requests only until `fill_from`, then also agents filling their caps."""
    import grpc

    from goleash.api.goleash.v1 import ingest_service_pb2 as ing
    from goleash.bench.ingest import AGENT_TOKEN

    fill_id = b"filler"
    refused: dict[str, int] = {}
    accepted = 0
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as ch:
        call = ch.stream_unary(
            "/goleash.v1.IngestService/StreamBatches",
            request_serializer=None,
            response_deserializer=ing.StreamBatchesResponse.FromString,
        )
        auth = (("authorization", f"Bearer {AGENT_TOKEN}"),)
        k = 0
        while time.time() < until:
            k += 1
            fill = time.time() >= fill_from
            batch = [*payloads]
            if fill:
                batch.append(
                    (f"filler agent {k}", filler.replace(fill_id, b"fil%03d" % (k % 1000), 1))
                )
            for name, body in batch:
                try:
                    # a hostile agent holds the agents' token: what it sends passes
                    # authentication and meets the caps
                    call(iter([body]), timeout=30, metadata=auth)
                    accepted += 1
                except grpc.RpcError as exc:
                    key = f"{name.split(' agent ')[0]}: {exc.code().name}"
                    refused[key] = refused.get(key, 0) + 1
                if time.time() >= until:
                    break
    out["refused"] = refused
    out["accepted"] = accepted


@dataclass
class _Watch:
    """What a viewer saw of the control plane while the attack ran."""

    fill_from: float  # wall time the attacker moves from refused batches to filling caps
    base: float = 0.0  # RSS MiB before the attack
    rss: list[tuple[float, float]] = field(default_factory=list)  # (wall time, MiB)
    slowest: list[float] = field(default_factory=lambda: [0.0, 0.0])  # refused, filling
    result: dict[str, Any] = field(default_factory=dict)  # the attacker's counts
    applied: int = 0  # fleet batches applied during the attack


def run(report: Report) -> None:
    from goleash.bench import ingest
    from goleash.control.limits import DEFAULT_LIMITS

    intervals = math.ceil((WARMUP_S + HOSTILE_S) / ingest.INTERVAL_S) + 1
    saved = os.environ.get("GOLEASH_BENCH_INGEST_INTERVALS")
    os.environ["GOLEASH_BENCH_INGEST_INTERVALS"] = str(intervals)  # the spawned fleet reads it
    with tempfile.TemporaryDirectory(prefix="goleash-bench-hostile-") as tmp:
        cp, address = ingest._start_control_plane(Path(tmp) / "goleash.db")
        try:
            payloads = _hostile_payloads()  # built before the clock starts
            filler = _filler("filler", DEFAULT_LIMITS.sites_per_agent)
            t0 = time.time() + 6.0
            ctx = mp.get_context("spawn")
            recv, send = ctx.Pipe(duplex=False)
            fleet = ctx.Process(
                target=ingest._agents_process, args=(address, t0, send), daemon=True
            )
            fleet.start()
            w = _watch_attack(address, cp.pid, payloads, filler, attack_from=t0 + WARMUP_S)
            run_ = recv.recv() if recv.poll(120) else None
            fleet.join(timeout=30)
            peak_hwm = ingest._status_kb(cp.pid, "VmHWM") / 1024
        finally:
            cp.terminate()
            cp.wait(timeout=30)
            if saved is None:
                os.environ.pop("GOLEASH_BENCH_INGEST_INTERVALS", None)
            else:
                os.environ["GOLEASH_BENCH_INGEST_INTERVALS"] = saved
    _report(report, w, run_, peak_hwm=peak_hwm)


def _watch_attack(
    address: str,
    cp_pid: int,
    payloads: list[tuple[str, bytes]],
    filler: bytes,
    *,
    attack_from: float,
) -> _Watch:
    """Wait for the attack's start, run the attacker, and meanwhile query and sample
    the control plane's RSS until it ends."""
    import grpc

    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
    from goleash.bench import ingest

    attack_to = attack_from + HOSTILE_S
    w = _Watch(fill_from=attack_from + HOSTILE_S / 2)
    with grpc.insecure_channel(address) as plain:
        api = q_grpc.GoleashServiceStub(grpc.intercept_channel(plain, ingest._Viewer()))
        while time.time() < attack_from:
            time.sleep(0.2)
        w.base = ingest._status_kb(cp_pid, "VmRSS") / 1024
        applied0 = sum(a.batches for a in api.ListAgents(q.ListAgentsRequest()).agents)
        attacker = threading.Thread(
            target=_attack,
            args=(address, payloads, filler, w.fill_from, attack_to, w.result),
            daemon=True,
        )
        attacker.start()
        while time.time() < attack_to:
            began, began_wall = time.perf_counter(), time.time()
            api.ListOrphans(q.ListOrphansRequest(), timeout=60)
            phase = 0 if began_wall < w.fill_from else 1
            w.slowest[phase] = max(w.slowest[phase], time.perf_counter() - began)
            w.rss.append((time.time(), ingest._status_kb(cp_pid, "VmRSS") / 1024))
            time.sleep(0.25)
        attacker.join(timeout=60)
        applied1 = sum(
            a.batches
            for a in api.ListAgents(q.ListAgentsRequest()).agents
            if a.identity.agent_id.startswith("agent-")
        )
    w.applied = applied1 - applied0
    return w


def _report(report: Report, w: _Watch, run_: AgentRun | None, *, peak_hwm: float) -> None:
    from goleash.bench import ingest
    from goleash.control.limits import DEFAULT_LIMITS

    lim = DEFAULT_LIMITS
    shape = f"{ingest.AGENTS} agents x {ingest.PROCESSES} processes + 1 hostile client"
    report.line("fleet", ingest.AGENTS, "agents", shape)
    report.line("control plane RSS, fleet only", w.base, "MiB")
    report.line(
        "control plane RSS peak under attack (then filling the caps)",
        max((r for _, r in w.rss), default=0.0),
        "MiB",
        f"{HOSTILE_S:g} s of hostile batches; VmHWM {peak_hwm:.0f} MiB",
    )
    refused_only = [r for at, r in w.rss if at < w.fill_from]
    report.line(
        "control plane RSS peak, refused requests only",
        max(refused_only, default=0.0),
        "MiB",
        f"first {HOSTILE_S / 2:g} s: oversized batches, all refused",
    )
    report.line("control plane RSS at the end", w.rss[-1][1] if w.rss else 0.0, "MiB")
    report.line(
        "caps",
        lim.sites_total,
        "sites",
        f"per agent {lim.sites_per_agent}, per process {lim.sites_per_process}; processes "
        f"{lim.processes_total} ({lim.processes_per_agent}/agent); agents {lim.agents}; "
        f"functions {lim.functions_per_process}/process; kept {lim.kept_goroutines}; "
        f"stack {lim.stack_depth} frames",
    )
    refused = w.result.get("refused", {})
    report.line(
        "hostile requests refused",
        sum(refused.values()),
        "requests",
        ", ".join(f"{k} x{n}" for k, n in sorted(refused.items())),
    )
    report.line("hostile batches within the caps accepted", w.result.get("accepted", 0), "batches")
    report.line("slowest ListOrphans, refused requests only", w.slowest[0] * 1000, "ms")
    report.line(
        "slowest ListOrphans while filling the caps",
        w.slowest[1] * 1000,
        "ms",
        f"each filler applies {lim.sites_per_agent} new sites at once",
    )
    if run_ is not None:
        report.line(
            "fleet batches applied / sent",
            run_.accepted / max(run_.sent, 1),
            "ratio",
            f"{run_.accepted} of {run_.sent}; {w.applied} applied during the attack",
        )
