"""ListEvents, WatchEvents and ListDecisions: the event log through the API.

Paged, bounded in bytes, and scrubbed of credentials on the way out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
from google.protobuf import struct_pb2

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import auth
from goleash.control.events import EventLog, EventQuery, EventRecord
from goleash.control.limits import ControlError, InvalidArgument
from goleash.control.paging import (
    MAX_RESPONSE_BYTES,
    decode_page_token,
    encode_page_token,
    page_size,
)

WATCH_QUEUE = 10_000  # events a slow watcher may lag behind before it is cut off
REPLAY_PAGE = 500  # events read from the log per query while a watcher catches up


def event_message(e: EventRecord) -> t.Event:
    details = struct_pb2.Struct()
    # scrubbed on the way out too: a database written before scrubbing existed
    details.update(auth.scrub(e.details))
    return t.Event(
        id=e.id,
        time_unix_nano=int(e.time * 1e9),
        kind=cast(t.EventKind, e.kind),
        service=e.service,
        agent_id=e.agent_id,
        pid=e.pid,
        message=auth.scrub(e.message),
        details=details,
    )


def event_query(f: q.EventFilter) -> EventQuery:
    for k in f.kinds:
        if k not in t.EventKind.values() or k == t.EVENT_KIND_UNSPECIFIED:
            raise InvalidArgument(f"filter.kinds: {k} is not an EventKind")
    return EventQuery(frozenset(f.kinds), f.service, f.agent_id, f.pid)


def bounded_events(into: Any, found: list[EventRecord]) -> int | None:
    """Add events to a response while it stays under the client's message limit; the
    id of the last one added when some were left for the next page, else None."""
    size = 0
    for e in found:
        m = event_message(e)
        size += m.ByteSize() + 8
        if size > MAX_RESPONSE_BYTES and len(into):
            return int(into[-1].id)
        into.append(m)
    return None


def list_events(events: EventLog, request: q.ListEventsRequest) -> q.ListEventsResponse:
    where = event_query(request.filter)
    size = page_size(request.page_size)
    cursor = decode_page_token("events", request.page_token)
    after, before = request.after_id, 0
    if cursor:
        if request.newest_first:
            before = cursor
        else:
            after = max(after, cursor)
    found = events.query(
        where,
        after_id=after,
        before_id=before,
        newest_first=request.newest_first,
        limit=size + 1,
    )
    out = q.ListEventsResponse()
    last = bounded_events(out.events, found[:size])
    if last is not None or len(found) > size:
        out.next_page_token = encode_page_token("events", last or found[size - 1].id)
    return out


def list_decisions(events: EventLog, request: q.ListDecisionsRequest) -> q.ListDecisionsResponse:
    size = page_size(request.page_size)
    before = decode_page_token("decisions", request.page_token)
    where = EventQuery(
        frozenset({t.EVENT_KIND_DECISION, t.EVENT_KIND_ACTION}), service=request.service
    )
    found = events.query(where, before_id=before, newest_first=True, limit=size + 1)
    out = q.ListDecisionsResponse()
    last = bounded_events(out.decisions, found[:size])
    if last is not None or len(found) > size:
        out.next_page_token = encode_page_token("decisions", last or found[size - 1].id)
    return out


async def watch_events(
    events: EventLog, request: q.WatchEventsRequest, context: grpc.aio.ServicerContext
) -> AsyncGenerator[q.WatchEventsResponse, None]:
    """The log from the requested point, then every new event, until the watcher
    falls WATCH_QUEUE events behind (it resumes with after_id)."""
    try:
        where = event_query(request.filter)
    except ControlError as exc:
        await context.abort(grpc.StatusCode[exc.status], str(exc))
    queue: asyncio.Queue[EventRecord | None] = asyncio.Queue()

    def on_event(e: EventRecord) -> None:
        if queue.qsize() >= WATCH_QUEUE:
            queue.put_nowait(None)  # marks the overflow; the stream ends below
        elif where.matches(e):
            queue.put_nowait(e)

    unsubscribe = events.subscribe(on_event)
    try:
        last = 0 if request.from_start else request.after_id
        if request.from_start or request.after_id:
            while True:  # replay the log, then follow the queue
                page = events.query(where, after_id=last, limit=REPLAY_PAGE)
                for e in page:
                    yield q.WatchEventsResponse(event=event_message(e))
                    last = e.id
                if len(page) < REPLAY_PAGE:
                    break
        while True:
            followed = await queue.get()
            if followed is None:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"watcher fell {WATCH_QUEUE} events behind; resume with after_id={last}",
                )
                return
            if followed.id > last:
                last = followed.id
                yield q.WatchEventsResponse(event=event_message(followed))
    finally:
        unsubscribe()
