"""IngestService: each agent's long-lived stream of batches, applied to the Store.

A refused batch is released before the stream is aborted (see StreamBatches)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.control import auth
from goleash.control.limits import ControlError, InvalidArgument
from goleash.control.owners import AgentOwners
from goleash.control.state import Store


class IngestServicer(ing_grpc.IngestServiceServicer):
    def __init__(self, store: Store, owners: AgentOwners, clock: Callable[[], float]) -> None:
        self._store = store
        self._owners = owners
        self._clock = clock

    async def StreamBatches(
        self,
        request_iterator: AsyncIterator[ing.StreamBatchesRequest],
        context: grpc.aio.ServicerContext,
    ) -> ing.StreamBatchesResponse:
        store, clock = self._store, self._clock
        agent_id = ""
        out = ing.StreamBatchesResponse()
        why = "stream closed by the agent"
        refused: ControlError | None = None
        messages = aiter(request_iterator)
        try:
            async for req in messages:
                b = req.batch
                try:
                    if not agent_id:
                        # who may write this agent id first: strangers learn nothing
                        # about what the store would accept
                        self._owners.check(b.agent.agent_id, auth.current().name)
                        store.check_batch(b)
                        agent_id = b.agent.agent_id
                        store.stream_opened(b.agent, clock())
                        self._owners.claim(agent_id, auth.current().name, clock())
                    elif b.agent.agent_id != agent_id:
                        raise InvalidArgument(
                            f"one stream carries one agent: {agent_id!r} then {b.agent.agent_id!r}"
                        )
                    a = store.agents[agent_id]
                    self._owners.touch(agent_id, clock())
                    gaps = a.gaps
                    if store.ingest(b, clock()):
                        out.accepted += 1
                    else:
                        out.duplicates += 1
                    out.gaps += a.gaps - gaps
                    out.last_sequence = a.last_sequence
                except ControlError as exc:
                    refused = exc
                    break
            if refused is not None:
                # Abort outside the loop, with no reference left to the refused batch:
                # the abort's traceback keeps this frame (and the request iterator) in
                # cycles only a full collection frees, and a 300k-site batch is 45 MB.
                # grpc's receiving generator and its receiver form a cycle holding the
                # last message until closed: close it (a finished stream closes itself).
                why = f"rejected: {refused}"
                refused.__traceback__ = None
                req = b = request_iterator = None  # type: ignore[assignment]
                aclose = getattr(messages, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                messages = None  # type: ignore[assignment]
                await context.abort(grpc.StatusCode[refused.status], str(refused))
        except asyncio.CancelledError:
            why = "connection lost"
            raise
        finally:
            if agent_id:
                store.stream_closed(agent_id, clock(), why)
        return out
