"""The control plane's gRPC server: ingest, queries, events, policy; health; reflection.

One asyncio gRPC server (grpc.aio): a thousand agents each hold a long-lived ingest
stream, which a thread-per-RPC server could not afford. Everything runs on the event
loop thread, so the Store needs no locks; handlers are short and synchronous inside.

Security: TLS when a certificate and key are configured, mTLS when a CA is too
(clients must present a certificate it signed). When a token is configured, the
RPCs that change the control plane (SetPolicy, OverrideService) require metadata
`authorization: Bearer TOKEN`. The default address is loopback only.

Garbage collection: the state of 20k processes is about a million objects the cyclic
collector would walk in every full collection (about a second during which no RPC is
served). The collector's automatic full collections are turned off; young
generations still run, and the upkeep task does a full collection every
`full_gc_seconds` (10 min), logging how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import ipaddress
import logging
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES
from goleash.control.detect import DEFAULT_LEAK_PARAMS, LeakParams
from goleash.control.engine import EngineLoop
from goleash.control.events import (
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_MAX_BYTES,
    EventLog,
    EventQuery,
    EventRecord,
    open_db,
    resolve_db_path,
)
from goleash.control.policy import PolicyError, PolicyStore, check_override
from goleash.control.state import (
    MAX_RESPONSE_BYTES,
    ControlError,
    InvalidArgument,
    NotFound,
    Store,
    decode_page_token,
    encode_page_token,
    page_size,
)
from goleash.errors import GoleashError

log = logging.getLogger("goleash.control")

GOLEASH_SERVICE = q.DESCRIPTOR.services_by_name["GoleashService"].full_name
INGEST_SERVICE = ing.DESCRIPTOR.services_by_name["IngestService"].full_name
MUTATING = ("SetPolicy", "OverrideService")
# Health service names: "" is liveness; READY is SERVING once the event log is open,
# the policy loaded and the API listening (readiness probes, load balancers).
READY_SERVICE = "goleash.ready"
WATCH_QUEUE = 10_000  # events a slow watcher may lag behind before it is cut off


class ServerSetupError(GoleashError):
    """The server cannot start with this configuration."""


@dataclass
class ControlPlaneConfig:
    """How to run the control plane (CLI flags map one to one)."""

    listen: str = DEFAULT_LISTEN
    db: str | None = None  # file or directory; None: /var/lib/goleash/goleash.db
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # set: clients must present a certificate it signed
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    upkeep_seconds: float = 5.0  # pruning and leak detection period
    full_gc_seconds: float = 600.0  # full garbage collection period (0: Python's default)
    leak: LeakParams = DEFAULT_LEAK_PARAMS
    policy_file: str | None = None  # hot-reloaded; validated before it replaces the running one
    report_dir: str | None = None  # flame graphs of decisions; None: reports/ beside the db
    # plaintext grpc.health.v1 only (the kubelet's gRPC probes cannot speak TLS)
    health_listen: str | None = None
    metrics_listen: str | None = None  # Prometheus /metrics over HTTP
    events_max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS  # event log retention
    events_max_bytes: int = DEFAULT_MAX_BYTES


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost" or listen.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ServerSetupError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def server_credentials(cfg: ControlPlaneConfig) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert or cfg.tls_key or cfg.tls_ca):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ServerSetupError("TLS needs both --tls-cert and --tls-key (--tls-ca adds mTLS)")
    ca = _read(cfg.tls_ca, "TLS CA bundle") if cfg.tls_ca else None
    return grpc.ssl_server_credentials(
        [(_read(cfg.tls_key, "TLS key"), _read(cfg.tls_cert, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def event_message(e: EventRecord) -> t.Event:
    details = struct_pb2.Struct()
    details.update(e.details)
    return t.Event(
        id=e.id,
        time_unix_nano=int(e.time * 1e9),
        kind=e.kind,
        service=e.service,
        agent_id=e.agent_id,
        pid=e.pid,
        message=e.message,
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


R = TypeVar("R")


def _status(fn: Callable[..., R]) -> Callable[..., Awaitable[R]]:
    """Run a synchronous handler; turn ControlError into its gRPC status."""

    @functools.wraps(fn)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return fn(self, request, context)
        except ControlError as exc:
            await context.abort(grpc.StatusCode[exc.status], str(exc))
            raise  # unreachable: abort raises

    return handler


class IngestServicer(ing_grpc.IngestServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def StreamBatches(
        self,
        request_iterator: AsyncIterator[ing.StreamBatchesRequest],
        context: grpc.aio.ServicerContext,
    ) -> ing.StreamBatchesResponse:
        store, clock = self._cp.store, self._cp.clock
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
                        store.check_batch(b)
                        agent_id = b.agent.agent_id
                        store.stream_opened(b.agent, clock())
                    elif b.agent.agent_id != agent_id:
                        raise InvalidArgument(
                            f"one stream carries one agent: {agent_id!r} then {b.agent.agent_id!r}"
                        )
                    a = store.agents[agent_id]
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


class GoleashServicer(q_grpc.GoleashServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @property
    def _store(self) -> Store:
        return self._cp.store

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        token = self._cp.config.token
        if not token:
            return
        sent = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else value.decode()
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} changes the control plane and needs its token: send metadata "
                "'authorization: Bearer TOKEN' (goleash: --token or GOLEASH_TOKEN)",
            )

    @_status
    def ListAgents(self, request: q.ListAgentsRequest, context: Any) -> q.ListAgentsResponse:
        return self._store.list_agents(self._cp.clock())

    @_status
    def ListProcesses(
        self, request: q.ListProcessesRequest, context: Any
    ) -> q.ListProcessesResponse:
        return self._store.list_processes(request, self._cp.clock())

    @_status
    def GetGoroutineSummary(
        self, request: q.GetGoroutineSummaryRequest, context: Any
    ) -> q.GetGoroutineSummaryResponse:
        return self._store.goroutine_summary(request, self._cp.clock())

    @_status
    def ListGoroutines(
        self, request: q.ListGoroutinesRequest, context: Any
    ) -> q.ListGoroutinesResponse:
        return self._store.list_goroutines(request, self._cp.clock())

    @_status
    def ListOrphans(self, request: q.ListOrphansRequest, context: Any) -> q.ListOrphansResponse:
        return self._store.list_orphans(request, self._cp.clock())

    @_status
    def ListLeakSuspects(
        self, request: q.ListLeakSuspectsRequest, context: Any
    ) -> q.ListLeakSuspectsResponse:
        return self._store.leak_suspects(request, self._cp.clock())

    @_status
    def GetFunctionLatency(
        self, request: q.GetFunctionLatencyRequest, context: Any
    ) -> q.GetFunctionLatencyResponse:
        return self._store.function_latency(request, self._cp.clock())

    @_status
    def ListEvents(self, request: q.ListEventsRequest, context: Any) -> q.ListEventsResponse:
        where = event_query(request.filter)
        size = page_size(request.page_size)
        cursor = decode_page_token("events", request.page_token)
        after, before = request.after_id, 0
        if cursor:
            if request.newest_first:
                before = cursor
            else:
                after = max(after, cursor)
        found = self._cp.events.query(
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

    async def WatchEvents(
        self, request: q.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[q.WatchEventsResponse]:
        try:
            where = event_query(request.filter)
        except ControlError as exc:
            await context.abort(grpc.StatusCode[exc.status], str(exc))
        events = self._cp.events
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
                    page = events.query(where, after_id=last, limit=500)
                    for e in page:
                        yield q.WatchEventsResponse(event=event_message(e))
                        last = e.id
                    if len(page) < 500:
                        break
            while True:
                e = await queue.get()
                if e is None:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"watcher fell {WATCH_QUEUE} events behind; resume with after_id={last}",
                    )
                    return
                if e.id > last:
                    last = e.id
                    yield q.WatchEventsResponse(event=event_message(e))
        finally:
            unsubscribe()

    @_status
    def GetPolicy(self, request: q.GetPolicyRequest, context: Any) -> q.GetPolicyResponse:
        policies = self._cp.policies
        out = q.GetPolicyResponse()
        cur = policies.current
        if cur is not None:
            out.policy_yaml = cur.document.text
            out.version = cur.version
            out.set_unix_nano = int(cur.set_at * 1e9)
            out.source = cur.source
            out.mode = q.PolicyMode.Value("POLICY_MODE_" + cur.document.mode.upper())
        for o in policies.active_overrides():
            out.overrides.append(override_message(o))
        return out

    async def SetPolicy(
        self, request: q.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> q.SetPolicyResponse:
        await self._authorize(context, "SetPolicy")
        policies, events = self._cp.policies, self._cp.events
        running = policies.current.version if policies.current else 0
        try:
            if request.validate_only:
                from goleash.control.policy import validate_policy

                doc = validate_policy(request.policy_yaml)
                return q.SetPolicyResponse(
                    version=running, mode=_mode(doc.mode), rules=len(doc.rules)
                )
            accepted = policies.set(request.policy_yaml, "api")
        except PolicyError as exc:
            if not request.validate_only:
                events.append(
                    t.EVENT_KIND_POLICY_REJECTED,
                    f"policy rejected ({exc}); version {running} keeps running",
                    details={"line": exc.line, "reason": exc.reason, "running_version": running},
                )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"policy rejected: {exc} (the running policy, version {running}, is unchanged)",
                trailing_metadata=(
                    ("goleash-policy-line", str(exc.line)),
                    ("goleash-policy-reason", exc.reason.encode("ascii", "replace").decode()),
                ),
            )
            raise  # unreachable
        doc = accepted.document
        events.append(
            t.EVENT_KIND_POLICY_SET,
            f"policy version {accepted.version} running ({doc.mode}, {len(doc.rules)} rule(s))",
            details={"version": accepted.version, "mode": doc.mode, "rules": len(doc.rules)},
        )
        return q.SetPolicyResponse(
            version=accepted.version, mode=_mode(doc.mode), rules=len(doc.rules)
        )

    @_status
    def ListDecisions(
        self, request: q.ListDecisionsRequest, context: Any
    ) -> q.ListDecisionsResponse:
        size = page_size(request.page_size)
        before = decode_page_token("decisions", request.page_token)
        where = EventQuery(
            frozenset({t.EVENT_KIND_DECISION, t.EVENT_KIND_ACTION}), service=request.service
        )
        found = self._cp.events.query(where, before_id=before, newest_first=True, limit=size + 1)
        out = q.ListDecisionsResponse()
        last = bounded_events(out.decisions, found[:size])
        if last is not None or len(found) > size:
            out.next_page_token = encode_page_token("decisions", last or found[size - 1].id)
        return out

    async def OverrideService(
        self, request: q.OverrideServiceRequest, context: grpc.aio.ServicerContext
    ) -> q.OverrideServiceResponse:
        await self._authorize(context, "OverrideService")
        try:
            return self._override(request)
        except ControlError as exc:
            await context.abort(grpc.StatusCode[exc.status], str(exc))
            raise  # unreachable

    def _override(self, r: q.OverrideServiceRequest) -> q.OverrideServiceResponse:
        policies, events = self._cp.policies, self._cp.events
        if not r.service:
            raise InvalidArgument("service is required")
        if r.action not in q.OverrideAction.values() or r.action == 0:
            raise InvalidArgument(
                "action must be PAUSE_RULE, FORCE_DEGRADE, FORCE_RECOVER or CLEAR"
            )
        if r.service not in self._store.services:
            raise NotFound(f"no service named {r.service!r} has been seen by this control plane")
        check_override(r.rule, r.level, r.reason, r.duration_seconds)
        action = q.OverrideAction.Name(r.action).removeprefix("OVERRIDE_ACTION_")
        out = q.OverrideServiceResponse()
        if r.action == q.OVERRIDE_ACTION_CLEAR:
            out.cleared = policies.clear_overrides(r.service)
        else:
            if r.action == q.OVERRIDE_ACTION_PAUSE_RULE:
                if not r.rule:
                    raise InvalidArgument("PAUSE_RULE needs rule (the rule's name)")
                cur = policies.current
                names = [rule["name"] for rule in cur.document.rules] if cur else []
                if r.rule not in names:
                    raise NotFound(
                        f"the running policy has no rule {r.rule!r} "
                        f"(rules: {', '.join(names) or 'none'})"
                    )
                out.cleared = policies.clear_overrides(r.service, action=r.action, rule=r.rule)
            else:  # degrade and recover replace each other
                for a in (q.OVERRIDE_ACTION_FORCE_DEGRADE, q.OVERRIDE_ACTION_FORCE_RECOVER):
                    out.cleared += policies.clear_overrides(r.service, action=a)
            o = policies.add_override(
                r.service, r.action, r.rule, r.level, r.reason, r.duration_seconds
            )
            out.override.CopyFrom(override_message(o))
        events.append(
            t.EVENT_KIND_OVERRIDE,
            f"{r.service}: override {action.lower()}"
            + (f" {r.rule}" if r.rule else "")
            + (f" {r.level}" if r.level else "")
            + (f" for {r.duration_seconds:g}s" if r.duration_seconds else "")
            + (f" ({r.reason})" if r.reason else ""),
            service=r.service,
            details={
                "action": action,
                "rule": r.rule,
                "level": r.level,
                "duration_seconds": r.duration_seconds,
                "reason": r.reason,
                "cleared": out.cleared,
            },
        )
        return out


def _mode(mode: str) -> int:
    return q.PolicyMode.Value("POLICY_MODE_" + mode.upper())


def override_message(o: Any) -> q.Override:
    return q.Override(
        id=o.id,
        service=o.service,
        action=o.action,
        rule=o.rule,
        level=o.level,
        reason=o.reason,
        created_unix_nano=int(o.created * 1e9),
        expires_unix_nano=int(o.expires * 1e9),
    )


class ControlPlane:
    """The control plane: state, event log, policy store and the gRPC server."""

    def __init__(self, config: ControlPlaneConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.db_path = resolve_db_path(config.db)
        self._conn: sqlite3.Connection = open_db(self.db_path)
        self.events = EventLog(
            self._conn,
            clock,
            max_age_seconds=config.events_max_age_seconds,
            max_bytes=config.events_max_bytes,
        )
        self.policies = PolicyStore(self._conn, clock)
        self.store = Store(
            self.events.append, leak=config.leak, known_processes=self._open_processes()
        )
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics: Any = None
        self.health_address = self.metrics_address = ""
        report_dir = config.report_dir
        if report_dir is None and self.db_path != ":memory:":
            report_dir = str(Path(self.db_path).parent / "reports")
        self.engine = EngineLoop(
            self.store,
            self.events,
            self.policies,
            clock=clock,
            policy_file=config.policy_file,
            report_dir=report_dir,
        )
        self.address = ""

    def _open_processes(self) -> set[tuple[str, int, int]]:
        """Processes whose last lifecycle event is APPEARED (so a restart does not log
        them again when their agents re-announce them)."""
        open_: set[tuple[str, int, int]] = set()
        kinds = (t.EVENT_KIND_PROCESS_APPEARED, t.EVENT_KIND_PROCESS_GONE)
        for e in self.events.iter_kinds(kinds):
            ident = (e.agent_id, e.pid, int(e.details.get("start_time_unix_nano", 0)))
            if e.kind == t.EVENT_KIND_PROCESS_APPEARED:
                open_.add(ident)
            else:
                open_.discard(ident)
        return open_

    async def start(self) -> str:
        """Bind and serve; returns the address actually bound ("host:port")."""
        cfg = self.config
        creds = server_credentials(cfg)
        if creds is None and not is_loopback(cfg.listen):
            log.warning(
                "listening on %s without TLS: anyone who can reach it can read the data "
                "and feed it; configure --tls-cert/--tls-key (and --tls-ca for mTLS)",
                cfg.listen,
            )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second control plane must not share the port
            ]
        )
        ing_grpc.add_IngestServiceServicer_to_server(IngestServicer(self), server)
        q_grpc.add_GoleashServiceServicer_to_server(GoleashServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (GOLEASH_SERVICE, INGEST_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
        try:
            if creds is None:
                port = server.add_insecure_port(cfg.listen)
            else:
                port = server.add_secure_port(cfg.listen, creds)
        except RuntimeError as exc:
            raise ServerSetupError(
                f"cannot listen on {cfg.listen}: {exc} (in use by another process, or a bad "
                "address; use --listen HOST:PORT)"
            ) from exc
        await server.start()
        self._server = server
        self.address = f"{cfg.listen.rsplit(':', 1)[0]}:{port}"
        if cfg.health_listen:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            try:
                hport = self._health_server.add_insecure_port(cfg.health_listen)
            except RuntimeError as exc:
                raise ServerSetupError(
                    f"cannot listen on --health-listen {cfg.health_listen}: {exc}"
                ) from exc
            await self._health_server.start()
            self.health_address = f"{cfg.health_listen.rsplit(':', 1)[0]}:{hport}"
        if cfg.metrics_listen:
            from goleash.control.metrics import MetricsServer, view

            self._metrics = MetricsServer(
                cfg.metrics_listen,
                asyncio.get_running_loop(),
                lambda: view(self.store, self.events.last_id(), self.clock()),
            )
            self.metrics_address = self._metrics.address
        for name in ("", GOLEASH_SERVICE, INGEST_SERVICE, READY_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.full_gc_seconds > 0:
            gc.freeze()  # what start-up allocated lives as long as the process
            g0, g1, _ = gc.get_threshold()
            gc.set_threshold(g0, g1, 1_000_000)  # no automatic full collections
        self._upkeep = asyncio.create_task(self._upkeep_loop())
        self.engine.start()
        return self.address

    async def _upkeep_loop(self) -> None:
        last_gc = time.monotonic()
        while True:
            await asyncio.sleep(self.config.upkeep_seconds)
            now = self.clock()
            try:
                self.store.prune(now)
                self.store.detect(now)
                self.events.prune()
            except Exception:  # keep serving; the next round may succeed
                log.exception("upkeep failed")
            period = self.config.full_gc_seconds
            if period > 0 and time.monotonic() - last_gc >= period:
                began = time.monotonic()
                gc.collect()
                last_gc = time.monotonic()
                if last_gc - began > 0.1:
                    log.info("full garbage collection took %.2fs", last_gc - began)

    async def stop(self, grace: float = 2.0) -> None:
        await self.engine.stop()
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        await self.health.enter_graceful_shutdown()
        if self._metrics is not None:
            self._metrics.stop()
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(grace)
        self._conn.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def _serve(config: ControlPlaneConfig) -> None:
    cp = ControlPlane(config)
    address = await cp.start()
    tls = "mTLS" if config.tls_ca else ("TLS" if config.tls_cert else "no TLS")
    print(
        f"goleash control-plane: listening on {address} ({tls}, token "
        f"{'required for changes' if config.token else 'off'}, events in {cp.db_path}"
        + (f", health on {cp.health_address}" if cp.health_address else "")
        + (f", metrics on {cp.metrics_address}" if cp.metrics_address else "")
        + ")",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await cp.stop()


def serve(config: ControlPlaneConfig) -> int:
    """Run until SIGTERM/SIGINT (what `goleash control-plane` does)."""
    logging.basicConfig(level=logging.INFO, format="goleash control-plane: %(message)s")
    asyncio.run(_serve(config))
    return 0
