"""A simulated node agent: builds AgentBatch messages the way the real agent fills them,
and streams them to a control plane. This is the ingest contract in executable form
(see proto/goleash/v1/ingest_service.proto)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import grpc

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.histogram import from_values

HIST_BITS = 3


def process_info(
    pid: int,
    service: str,
    *,
    start: int = 0,
    exe: str = "",
    go_version: str = "go1.22.10",
    mode: int = t.TRACKING_MODE_PROBES,
    reason: str = "",
) -> t.ProcessInfo:
    return t.ProcessInfo(
        pid=pid,
        start_time_unix_nano=start or pid * 1_000_000_007,
        exe=exe or f"/usr/local/bin/{service}",
        service=service,
        go_version=go_version,
        tracking_mode=mode,
        tracking_reason=reason,
    )


def site(
    function: str,
    go_statement: str,
    *,
    live: int = 0,
    created: int = 0,
    exited: int = 0,
    oldest: float = 0.0,
    waits: Mapping[str, int] | None = None,
    orphans: int = 0,
    orphan_oldest: float = 0.0,
    orphan_reason: str = "",
    creator: str = "main.main",
) -> ing.SiteSummary:
    s = ing.SiteSummary(
        function=function,
        go_statement=go_statement,
        creator_function=creator,
        live=live,
        created=created,
        exited=exited,
    )
    s.age.p50_seconds = oldest / 2
    s.age.p90_seconds = s.age.p99_seconds = s.age.max_seconds = oldest
    for reason, n in (waits or {}).items():
        s.wait_reasons.add(reason=reason, count=n)
    if orphans:
        s.orphans.count = orphans
        s.orphans.oldest_age_seconds = orphan_oldest
        s.orphans.dominant_wait_reason = orphan_reason
        s.orphans.longest_blocked_seconds = orphan_oldest
    return s


def goroutine(
    goid: int,
    function: str,
    go_statement: str,
    *,
    age: float,
    blocked: float = 0.0,
    state: int = t.GOROUTINE_STATE_WAITING,
    reason: str = "chan receive",
    orphan: bool = False,
    parent: int = 1,
) -> t.Goroutine:
    file, _, line = go_statement.rpartition(":")
    g = t.Goroutine(
        goid=goid,
        parent_goid=parent,
        parent_exited=orphan,
        function=function,
        go_statement=go_statement,
        state=state,
        wait_reason=reason if state == t.GOROUTINE_STATE_WAITING else "",
        age_seconds=age,
        blocked_for_seconds=blocked,
        orphan=orphan,
    )
    g.stack.add(function="runtime.gopark", file="/go/src/runtime/proc.go", line=424)
    g.stack.add(function=function, file=file, line=int(line) + 3)
    return g


def snapshot(
    pid: int,
    sites: Sequence[ing.SiteSummary] = (),
    *,
    goroutines: int | None = None,
    kept: Sequence[t.Goroutine] = (),
    latency: Mapping[str, Iterable[int]] | None = None,
    panics: Mapping[str, int] | None = None,
    drops: Mapping[str, int] | None = None,
) -> ing.ProcessSnapshot:
    s = ing.ProcessSnapshot(
        pid=pid,
        goroutines=sum(x.live for x in sites) if goroutines is None else goroutines,
        sites=sites,
        goroutines_kept=kept,
    )
    for fn, values in (latency or {}).items():
        h = from_values(values, HIST_BITS)
        lat = s.latency.add(function=fn)
        lat.histogram.sub_bucket_bits = h.bits
        lat.histogram.count = h.count
        lat.histogram.sum_seconds = h.sum_seconds
        for idx in sorted(h.buckets):
            lat.histogram.buckets.add(index=idx, count=h.buckets[idx])
    for fn, n in (panics or {}).items():
        s.panics.add(function=fn, count=n)
    for reason, n in (drops or {}).items():
        s.drops.add(reason=reason, count=n)
    return s


class SimAgent:
    """Numbers batches like an agent: one instance id, sequence 1, 2, 3, ..."""

    def __init__(self, agent_id: str, node: str = "", interval: float = 5.0) -> None:
        self.identity = t.AgentIdentity(
            agent_id=agent_id,
            node_name=node or f"node-{agent_id}",
            instance_id=uuid.uuid4().hex,
            version="sim",
        )
        self.interval = interval
        self.sequence = 0

    def restart(self) -> None:
        """A new agent process: new instance id, sequence starts over."""
        self.identity.instance_id = uuid.uuid4().hex
        self.sequence = 0

    def batch(
        self,
        *,
        appeared: Sequence[t.ProcessInfo] = (),
        snapshots: Sequence[ing.ProcessSnapshot] = (),
        gone: Sequence[tuple[int, int, str]] = (),
        drops: Mapping[str, int] | None = None,
        sequence: int | None = None,
    ) -> ing.AgentBatch:
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        b = ing.AgentBatch(
            agent=self.identity,
            sequence=sequence,
            processes_appeared=appeared,
            snapshots=snapshots,
        )
        b.heartbeat.interval_seconds = self.interval
        b.heartbeat.tracked_processes = len(appeared)
        for pid, start, reason in gone:
            b.processes_gone.add(pid=pid, start_time_unix_nano=start, reason=reason)
        for reason, n in (drops or {}).items():
            b.drops.add(reason=reason, count=n)
        return b


def stream(
    channel: grpc.Channel,
    batches: Iterable[ing.AgentBatch],
    timeout: float = 30.0,
    token: str | None = None,
) -> ing.StreamBatchesResponse:
    """Send the batches on one ingest stream (with a token of the agent role when the
    control plane wants one); the server's summary when it closes."""
    stub = ing_grpc.IngestServiceStub(channel)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return stub.StreamBatches(
        (ing.StreamBatchesRequest(batch=b) for b in batches), timeout=timeout, metadata=md
    )
