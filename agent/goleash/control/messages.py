"""The read model (`queries`) as API messages: the servicer boundary, where typed rows
become protos, with the cap on a response's size."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.queries import (
    Ages,
    KeptGoroutine,
    LatencyWindow,
    LeakSuspects,
    OrphanGroup,
    ProcessList,
    SiteSummary,
)


def list_processes_response(found: ProcessList, max_bytes: int) -> q.ListProcessesResponse:
    out = q.ListProcessesResponse(window_seconds=found.window_seconds, total_size=found.total)
    size = 0
    for p in found.rows:
        out.processes.add(
            info=p.info,
            agent_id=p.agent_id,
            node_name=p.node_name,
            state=p.state,
            first_seen_unix_nano=_unix_ns(p.first_seen),
            last_seen_unix_nano=_unix_ns(p.last_seen),
            goroutines=p.goroutines,
            created=p.created,
            exited=p.exited,
            orphans=p.orphans,
            panics=p.panics,
            drops=[t.DropCount(reason=r, count=n) for r, n in sorted(p.drops.items())],
            gone_reason=p.gone_reason,
        )
        size += out.processes[-1].ByteSize() + 8
        if size > max_bytes:  # total_size tells the client what is missing
            del out.processes[-1]
            break
    return out


def function_latency_response(found: LatencyWindow) -> q.GetFunctionLatencyResponse:
    out = q.GetFunctionLatencyResponse(function=found.function, window_seconds=found.window_seconds)
    out.processes = found.processes
    out.calls, out.calls_error = found.calls, found.calls_error
    merged = found.histogram
    if merged is not None and merged.count:
        out.count = merged.count
        out.mean_seconds = found.mean_seconds
        out.histogram.sub_bucket_bits = merged.bits
        out.histogram.count = merged.count
        out.histogram.sum_seconds = merged.sum_seconds
        for idx in sorted(merged.buckets):
            out.histogram.buckets.add(index=idx, count=merged.buckets[idx])
    for x, value in found.quantiles:
        out.quantiles.add(quantile=x, value_seconds=value)
    return out


class _Budget:
    """Bytes of a response so far: the item just added is dropped (and the answer
    ends) once the client's message limit would be passed."""

    def __init__(self, max_bytes: int) -> None:
        self.size = 0
        self.max_bytes = max_bytes

    def full(self, items: Any) -> bool:
        self.size += items[-1].ByteSize() + 8
        if self.size > self.max_bytes:
            del items[-1]
            return True
        return False


def _ages(a: Ages) -> t.AgeQuantiles:
    return t.AgeQuantiles(
        p50_seconds=a.p50,
        p90_seconds=a.p90,
        p99_seconds=a.p99,
        max_seconds=a.max,
        max_is_lower_bound=a.max_is_lower_bound,
    )


def _waits(waits: Sequence[tuple[str, int]]) -> list[t.WaitReasonCount]:
    return [t.WaitReasonCount(reason=r, count=k) for r, k in waits]


def _record(g: KeptGoroutine | None) -> q.GoroutineRecord | None:
    return goroutine_record(g) if g is not None else None


def goroutine_record(g: KeptGoroutine) -> q.GoroutineRecord:
    return q.GoroutineRecord(
        service=g.service,
        agent_id=g.agent_id,
        pid=g.pid,
        goroutine=g.goroutine,
        observed_unix_nano=_unix_ns(g.observed),
    )


def goroutine_summary_response(found: SiteSummary, max_bytes: int) -> q.GetGoroutineSummaryResponse:
    out = q.GetGoroutineSummaryResponse(
        window_seconds=found.window_seconds, processes=found.processes
    )
    out.goroutines = found.goroutines
    out.created = found.created
    out.exited = found.exited
    out.orphans = found.orphans
    budget = _Budget(max_bytes)
    for s in found.rows:
        out.sites.add(
            service=s.service,
            function=s.function,
            go_statement=s.go_statement,
            creator_function=s.creator,
            live=s.live,
            created=s.created,
            exited=s.exited,
            growth_per_minute=s.growth_per_minute,
            age=_ages(s.age),
            wait_reasons=_waits(s.wait_reasons),
            orphans=s.orphans,
            processes=s.processes,
        )
        if budget.full(out.sites):
            break
    return out


def list_orphans_response(found: Iterable[OrphanGroup], max_bytes: int) -> q.ListOrphansResponse:
    out = q.ListOrphansResponse()
    budget = _Budget(max_bytes)
    for g in found:
        out.groups.add(
            service=g.service,
            function=g.function,
            go_statement=g.go_statement,
            creator_function=g.creator,
            count=g.count,
            oldest_age_seconds=g.oldest_age_seconds,
            oldest_age_is_lower_bound=g.oldest_age_is_lower_bound,
            reason=g.reason,
            longest_blocked_seconds=g.longest_blocked_seconds,
            processes=g.processes,
            example=_record(g.example),
        )
        if budget.full(out.groups):
            break
    return out


def leak_suspects_response(found: LeakSuspects, max_bytes: int) -> q.ListLeakSuspectsResponse:
    out = q.ListLeakSuspectsResponse(window_seconds=found.window_seconds)
    budget = _Budget(max_bytes)
    for s in found.rows:
        out.suspects.add(
            service=s.service,
            function=s.function,
            go_statement=s.go_statement,
            creator_function=s.creator,
            live=s.live,
            live_at_start=s.live_at_start,
            growth_per_minute=s.growth_per_minute,
            steady_fraction=s.steady_fraction,
            oldest_age_start_seconds=s.oldest_age_start_seconds,
            oldest_age_seconds=s.oldest_age_seconds,
            age=_ages(s.age),
            wait_reasons=_waits(s.wait_reasons),
            processes=s.processes,
            example=_record(s.example),
        )
        if budget.full(out.suspects):
            break
    return out


def _unix_ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)
