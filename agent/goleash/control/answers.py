"""The Store's query RPCs answered: the read model's rows built into API messages.

Request fields are checked, the typed read model (`queries`) asked, and its answer
turned into messages (`messages`) under the response size cap."""

from __future__ import annotations

from collections import Counter

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import messages, queries
from goleash.control.paging import (
    MAX_RESPONSE_BYTES,
    decode_page_token,
    encode_page_token,
    page_size,
)
from goleash.control.records import Selection
from goleash.control.state import STALE_INTERVALS, Store


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def _drops(c: Counter[str]) -> list[t.DropCount]:
    return [t.DropCount(reason=r, count=n) for r, n in sorted(c.items())]


def list_agents(store: Store, now: float) -> q.ListAgentsResponse:
    out = q.ListAgentsResponse()
    size = 0
    for agent_id in sorted(store.agents):
        a = store.agents[agent_id]
        if not a.streams:
            state = q.AGENT_STATE_DISCONNECTED
        elif now - a.last_seen > STALE_INTERVALS * a.interval:
            state = q.AGENT_STATE_STALE
        else:
            state = q.AGENT_STATE_CONNECTED
        out.agents.add(
            identity=a.identity,
            state=state,
            first_seen_unix_nano=_ns(a.first_seen),
            last_seen_unix_nano=_ns(a.last_seen),
            last_sequence=a.last_sequence,
            batches=a.batches,
            duplicates=a.duplicates,
            gaps=a.gaps,
            processes=len(a.procs),
            heartbeat=a.heartbeat,
            drops=_drops(a.drops),
        )
        size += out.agents[-1].ByteSize() + 8
        if size > MAX_RESPONSE_BYTES:  # the first agents, rather than no answer
            del out.agents[-1]
            break
    return out


def list_processes(
    store: Store, req: q.ListProcessesRequest, now: float
) -> q.ListProcessesResponse:
    found = queries.processes(
        store,
        Selection.of(req.selector),
        now,
        window_seconds=req.window_seconds,
        include_gone=req.include_gone,
        order_by=req.order_by,
        limit=req.limit,
    )
    return messages.list_processes_response(found, MAX_RESPONSE_BYTES)


def goroutine_summary(
    store: Store, req: q.GetGoroutineSummaryRequest, now: float
) -> q.GetGoroutineSummaryResponse:
    found = queries.sites(
        store,
        Selection.of(req.selector),
        now,
        window_seconds=req.window_seconds,
        limit=req.limit,
    )
    return messages.goroutine_summary_response(found, MAX_RESPONSE_BYTES)


def list_goroutines(
    store: Store, req: q.ListGoroutinesRequest, now: float
) -> q.ListGoroutinesResponse:
    """One page of the kept goroutines that pass the request's filter."""
    where = queries.GoroutineFilter(
        min_age_seconds=req.min_age_seconds,
        min_blocked_for_seconds=req.min_blocked_for_seconds,
        state=req.state,
        orphans_only=req.orphans_only,
        site=req.site,
    )
    where.check()
    size = page_size(req.page_size)
    start = decode_page_token("goroutines", req.page_token)
    found = queries.kept_goroutines(store, Selection.of(req.selector), where)
    out = q.ListGoroutinesResponse(total_size=len(found))
    for g in found[start : start + size]:
        out.goroutines.append(messages.goroutine_record(g))
    if start + size < len(found):
        out.next_page_token = encode_page_token("goroutines", start + size)
    return out


def list_orphans(store: Store, req: q.ListOrphansRequest, now: float) -> q.ListOrphansResponse:
    found = queries.orphans(
        store, Selection.of(req.selector), now, min_age_seconds=req.min_age_seconds
    )
    return messages.list_orphans_response(found, MAX_RESPONSE_BYTES)


def leak_suspects(
    store: Store, req: q.ListLeakSuspectsRequest, now: float
) -> q.ListLeakSuspectsResponse:
    found = queries.leak_suspects(
        store, Selection.of(req.selector), now, window_seconds=req.window_seconds
    )
    return messages.leak_suspects_response(found, MAX_RESPONSE_BYTES)


def function_latency(
    store: Store, req: q.GetFunctionLatencyRequest, now: float
) -> q.GetFunctionLatencyResponse:
    found = queries.function_latency(
        store,
        req.function,
        Selection.of(req.selector),
        now,
        window_seconds=req.window_seconds,
        quantiles=req.quantiles,
    )
    return messages.function_latency_response(found)
