"""The control plane's gRPC server: ingest, queries, events, policy; health; reflection.

One asyncio gRPC server (grpc.aio): a thousand agents each hold a long-lived ingest
stream, which a thread-per-RPC server could not afford. Everything runs on the event
loop thread, so the Store needs no locks; handlers are short and synchronous inside.
This module wires the parts: `config` (what to run), `transport` (TLS and the listen
check), `ingest_stream` (IngestService), and behind GoleashServicer `answers` (the
Store's queries), `event_api` (the event log) and `policy_api` (policy, overrides).

Security (auth, transport): every RPC has a role (agent, viewer, admin) checked by
an interceptor before its handler runs; callers authenticate with bearer tokens per
role or client certificates mapped to roles. TLS when a certificate and key are
configured, mTLS when a CA is too (clients must present a certificate it signed).
With no credentials configured the control plane serves loopback only; it refuses a
non-loopback address then unless --insecure says otherwise (logged loudly). Agent ids
belong to the principal that first wrote them; GetPolicy redacts secrets for
non-admins; policy changes and overrides are events naming who made them.

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
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import answers, auth, event_api, policy_api
from goleash.control.config import ControlPlaneConfig
from goleash.control.engine_loop import EngineLoop
from goleash.control.events import EventLog, EventRecord, open_db, resolve_db_path
from goleash.control.ingest_stream import IngestServicer
from goleash.control.limits import ControlError
from goleash.control.owners import AgentOwners
from goleash.control.policy import PolicyStore
from goleash.control.state import Store
from goleash.control.transport import (
    ServerSetupError,
    check_security,
    server_credentials,
)

log = logging.getLogger("goleash.control")

GOLEASH_SERVICE = q.DESCRIPTOR.services_by_name["GoleashService"].full_name
INGEST_SERVICE = ing.DESCRIPTOR.services_by_name["IngestService"].full_name
# Health service names: "" is liveness; READY is SERVING once the event log is open,
# the policy loaded and the API listening (readiness probes, load balancers).
READY_SERVICE = "goleash.ready"


class ScrubbedEventLog(EventLog):
    """The event log, with credentials scrubbed from every event before it is stored
    (an action's URL with user:password, a header quoted in an error): viewers read
    events, and secrets are never echoed."""

    def append(self, kind: int, message: str, **kw: Any) -> EventRecord:
        if kw.get("details"):
            kw["details"] = auth.scrub(kw["details"])
        return super().append(kind, auth.scrub(message), **kw)


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


class GoleashServicer(q_grpc.GoleashServiceServicer):
    """Each RPC delegates to the module that answers it (`answers` for the Store's
    queries, `event_api`, `policy_api`); ControlError becomes its gRPC status."""

    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    @property
    def _store(self) -> Store:
        return self._cp.store

    @_status
    def ListAgents(self, request: q.ListAgentsRequest, context: Any) -> q.ListAgentsResponse:
        return answers.list_agents(self._store, self._cp.clock())

    @_status
    def ListProcesses(
        self, request: q.ListProcessesRequest, context: Any
    ) -> q.ListProcessesResponse:
        return answers.list_processes(self._store, request, self._cp.clock())

    @_status
    def GetGoroutineSummary(
        self, request: q.GetGoroutineSummaryRequest, context: Any
    ) -> q.GetGoroutineSummaryResponse:
        return answers.goroutine_summary(self._store, request, self._cp.clock())

    @_status
    def ListGoroutines(
        self, request: q.ListGoroutinesRequest, context: Any
    ) -> q.ListGoroutinesResponse:
        return answers.list_goroutines(self._store, request, self._cp.clock())

    @_status
    def ListOrphans(self, request: q.ListOrphansRequest, context: Any) -> q.ListOrphansResponse:
        return answers.list_orphans(self._store, request, self._cp.clock())

    @_status
    def ListLeakSuspects(
        self, request: q.ListLeakSuspectsRequest, context: Any
    ) -> q.ListLeakSuspectsResponse:
        return answers.leak_suspects(self._store, request, self._cp.clock())

    @_status
    def GetFunctionLatency(
        self, request: q.GetFunctionLatencyRequest, context: Any
    ) -> q.GetFunctionLatencyResponse:
        return answers.function_latency(self._store, request, self._cp.clock())

    @_status
    def ListEvents(self, request: q.ListEventsRequest, context: Any) -> q.ListEventsResponse:
        return event_api.list_events(self._cp.events, request)

    async def WatchEvents(
        self, request: q.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[q.WatchEventsResponse]:
        # closed here, not by the collector: unsubscribing must not wait for it
        async with contextlib.aclosing(
            event_api.watch_events(self._cp.events, request, context)
        ) as stream:
            async for response in stream:
                yield response

    @_status
    def ListDecisions(
        self, request: q.ListDecisionsRequest, context: Any
    ) -> q.ListDecisionsResponse:
        return event_api.list_decisions(self._cp.events, request)

    @_status
    def GetPolicy(self, request: q.GetPolicyRequest, context: Any) -> q.GetPolicyResponse:
        return policy_api.get_policy(self._cp.policies, admin=auth.current().may(auth.Role.ADMIN))

    async def SetPolicy(
        self, request: q.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> q.SetPolicyResponse:
        return await policy_api.set_policy(self._cp.policies, self._cp.events, request, context)

    @_status
    def OverrideService(
        self, request: q.OverrideServiceRequest, context: Any
    ) -> q.OverrideServiceResponse:
        cp = self._cp
        return policy_api.override(
            cp.policies, cp.events, self._store.services, request, auth.current().name
        )


class ControlPlane:
    """The control plane: state, event log, policy store and the gRPC server."""

    def __init__(self, config: ControlPlaneConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.db_path = resolve_db_path(config.db)
        self._conn: sqlite3.Connection = open_db(self.db_path)
        self.events = ScrubbedEventLog(
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
        self.authenticator = auth.Authenticator.from_config(config.credentials)
        # agent id -> the principal that writes it (sequences belong to it)
        self.owners = AgentOwners(
            self._conn, self.store.limits.agent_ttl_seconds, self.store.limits.agents, clock()
        )
        self._server: grpc.aio.Server | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics: Any = None
        self._otlp: Any = None
        self.health_address = self.metrics_address = self.evidence_address = ""
        self._evidence: Any = None
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
        creds = server_credentials(self.config)
        check_security(self.config, self.authenticator, creds)
        self._start_evidence()  # first: its refusals must not leave a gRPC server behind
        await self._start_api(creds)
        await self._start_health_listener()
        self._start_metrics()
        self._start_otlp()
        for name in ("", GOLEASH_SERVICE, INGEST_SERVICE, READY_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._take_over_full_collections()
        self._upkeep = asyncio.create_task(self._upkeep_loop())
        self.engine.start()
        return self.address

    async def _start_api(self, creds: grpc.ServerCredentials | None) -> None:
        """The gRPC server: ingest, queries, health and reflection, behind the roles."""
        cfg = self.config
        self._interceptor = auth.AuthInterceptor(self.authenticator)
        server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second control plane must not share the port
            ],
        )
        ing_grpc.add_IngestServiceServicer_to_server(
            IngestServicer(self.store, self.owners, self.clock), server
        )
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

    async def _start_health_listener(self) -> None:
        """Plaintext grpc.health.v1 on its own port (kubelet probes cannot speak TLS)."""
        listen = self.config.health_listen
        if not listen:
            return
        self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        try:
            hport = self._health_server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise ServerSetupError(f"cannot listen on --health-listen {listen}: {exc}") from exc
        await self._health_server.start()
        self.health_address = f"{listen.rsplit(':', 1)[0]}:{hport}"

    def _metrics_view(self) -> Any:
        from goleash.control.metrics import view

        return view(self.store, self.events.last_id(), self.clock(), self.engine.engine)

    def _start_metrics(self) -> None:
        if not self.config.metrics_listen:
            return
        from goleash.control.metrics import MetricsServer

        self._metrics = MetricsServer(
            self.config.metrics_listen, asyncio.get_running_loop(), self._metrics_view
        )
        self.metrics_address = self._metrics.address

    def _start_evidence(self) -> None:
        """The decisions' evidence over HTTP(S), guarded by the API's credentials and
        TLS files, and the URL alerts link it with."""
        cfg = self.config
        if cfg.evidence_listen:
            from goleash.control.evidence_http import EvidenceAccess, EvidenceServer

            reports = self.engine.engine.report_dir
            if reports is None:
                raise ServerSetupError(
                    "--evidence-listen serves the reports beside the event log: give --db a file"
                )
            self._evidence = EvidenceServer(cfg.evidence_listen, reports, EvidenceAccess.of(cfg))
            self.evidence_address = self._evidence.address
            log.info(
                "evidence on %s, %s (curl -H 'Authorization: Bearer $GOLEASH_TOKEN' "
                "%s://%s/evidence/NAME)",
                self.evidence_address,
                self._evidence.access_summary,
                self._evidence.scheme,
                self.evidence_address,
            )
        external = cfg.external_url or (
            f"{self._evidence.scheme}://{self.evidence_address}" if self._evidence else ""
        )
        self.engine.engine.external_url = external.rstrip("/")

    def _start_otlp(self) -> None:
        cfg = self.config
        if not cfg.otlp_endpoint:
            return
        from goleash.control.metrics import control_registry
        from goleash.otlp import OtlpExporter

        registry = control_registry(asyncio.get_running_loop(), self._metrics_view)
        self._otlp = OtlpExporter(
            cfg.otlp_endpoint,
            registry,
            service_name="goleash-control-plane",
            interval=cfg.otlp_interval,
        ).start()

    def _take_over_full_collections(self) -> None:
        """Full collections run from the upkeep loop, every full_gc_seconds (module doc)."""
        if self.config.full_gc_seconds > 0:
            gc.freeze()  # what start-up allocated lives as long as the process
            g0, g1, _ = gc.get_threshold()
            gc.set_threshold(g0, g1, 1_000_000)  # no automatic full collections

    async def _upkeep_loop(self) -> None:
        last_gc = time.monotonic()
        while True:
            await asyncio.sleep(self.config.upkeep_seconds)
            now = self.clock()
            try:
                self.store.prune(now)
                self.store.detect(now)
                for agent_id in [i for i, a in self.store.agents.items() if a.streams]:
                    self.owners.touch(agent_id, now)  # a quiet stream still holds its id
                self.owners.expire(now)
                self.authenticator = auth.reloaded(self.authenticator, self.config.credentials)
                self._interceptor.authn = self.authenticator
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
        if self._evidence is not None:
            self._evidence.stop()
        if self._otlp is not None:
            await asyncio.to_thread(self._otlp.stop)  # its last export reads on this loop
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before "listening on": a stop may follow
        loop.add_signal_handler(sig, stop.set)
    address = await cp.start()
    tls = "mTLS" if config.tls_ca else ("TLS" if config.tls_cert else "no TLS")
    authn = cp.authenticator
    if authn.enabled:
        how = f"{len(authn.tokens)} token(s), {len(authn.rules)} certificate role(s)"
        access = f"authentication on: {how}"
    else:
        access = (
            "authentication OFF (--insecure)"
            if config.credentials.insecure
            else ("authentication off: loopback only")
        )
    # a log line (timestamped, JSON with --log-format json) that scripts wait for
    log.info(
        f"listening on {address} ({tls}, {access}, events in {cp.db_path}"
        + (f", health on {cp.health_address}" if cp.health_address else "")
        + (f", metrics on {cp.metrics_address}" if cp.metrics_address else "")
        + (f", evidence on {cp.evidence_address}" if cp.evidence_address else "")
        + ")"
    )
    await stop.wait()
    await cp.stop()


def serve(config: ControlPlaneConfig) -> int:
    """Run until SIGTERM/SIGINT (what `goleash control-plane` does)."""
    logging.basicConfig(level=logging.INFO, format="goleash control-plane: %(message)s")
    asyncio.run(_serve(config))
    return 0
