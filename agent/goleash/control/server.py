"""The control plane's gRPC server: ingest, queries, events, policy; health; reflection.

One asyncio gRPC server (grpc.aio): a thousand agents each hold a long-lived ingest
stream, which a thread-per-RPC server could not afford. Everything runs on the event
loop thread, so the Store needs no locks; handlers are short and synchronous inside.

Security (control/auth.py): every RPC has a role (agent, viewer, admin) checked by
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
import ipaddress
import logging
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES, auth
from goleash.control.detect import DEFAULT_LEAK_PARAMS, LeakParams
from goleash.control.engine_loop import EngineLoop
from goleash.control.events import (
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_MAX_BYTES,
    EventLog,
    EventQuery,
    EventRecord,
    open_db,
    resolve_db_path,
)
from goleash.control.policy import (
    PolicyError,
    PolicyStore,
    accept_policy,
    check_override,
    compile_policy,
)
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
# Health service names: "" is liveness; READY is SERVING once the event log is open,
# the policy loaded and the API listening (readiness probes, load balancers).
READY_SERVICE = "goleash.ready"
WATCH_QUEUE = 10_000  # events a slow watcher may lag behind before it is cut off


class ServerSetupError(GoleashError):
    """The server cannot start with this configuration."""


class PermissionDenied(ControlError):
    status = "PERMISSION_DENIED"


class ScrubbedEventLog(EventLog):
    """The event log, with credentials scrubbed from every event before it is stored
    (an action's URL with user:password, a header quoted in an error): viewers read
    events, and secrets are never echoed."""

    def append(self, kind: int, message: str, **kw: Any) -> EventRecord:
        if kw.get("details"):
            kw["details"] = auth.scrub(kw["details"])
        return super().append(kind, auth.scrub(message), **kw)


@dataclass
class ControlPlaneConfig:
    """How to run the control plane (CLI flags map one to one)."""

    listen: str = DEFAULT_LISTEN
    db: str | None = None  # file or directory; None: /var/lib/goleash/goleash.db
    credentials: auth.AuthConfig = field(default_factory=auth.AuthConfig)
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
    # the policy engine's evidence files over HTTP (/evidence/NAME), for alerts' links
    evidence_listen: str | None = None
    # how users reach this control plane's evidence server (alerts' generatorURL);
    # default: http://<evidence_listen address>
    external_url: str = ""
    otlp_endpoint: str | None = None  # also push the metrics over OTLP/gRPC there
    otlp_interval: float = 30.0
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


class CertificateFiles:
    """The server's key, certificate and client CA, re-read when they change on disk
    (cert-manager renews them; Kubernetes swaps a Secret volume's files at once).
    gRPC asks before every new connection's handshake; a stat of three files is the
    cost, and connections are long-lived (one ingest stream per agent)."""

    def __init__(self, key: str, cert: str, ca: str | None) -> None:
        self.paths = tuple(p for p in (key, cert, ca) if p)
        self.key, self.cert, self.ca = key, cert, ca
        self._stamp = self._stat()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.paths:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def configuration(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=_read(self.ca, "TLS CA bundle") if self.ca else None,
        )

    def fetch(self) -> Any:
        """A new configuration when the files changed, else None (keep the current)."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            fresh = self.configuration()
        except (OSError, ServerSetupError) as exc:  # mid-update: the next connection retries
            log.warning("TLS files changed but cannot be read yet: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed on disk: new connections use them")
        return fresh


def server_credentials(cfg: ControlPlaneConfig) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert or cfg.tls_key or cfg.tls_ca):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ServerSetupError("TLS needs both --tls-cert and --tls-key (--tls-ca adds mTLS)")
    try:
        files = CertificateFiles(cfg.tls_key, cfg.tls_cert, cfg.tls_ca)
    except OSError as exc:
        raise ServerSetupError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files.fetch, require_client_authentication=cfg.tls_ca is not None
    )


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
                        # who may write this agent id first: strangers learn nothing
                        # about what the store would accept
                        self._cp.check_owner(b.agent.agent_id, auth.current())
                        store.check_batch(b)
                        agent_id = b.agent.agent_id
                        store.stream_opened(b.agent, clock())
                        self._cp.agent_owners[agent_id] = auth.current().name
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

    @_status
    def GetPolicy(self, request: q.GetPolicyRequest, context: Any) -> q.GetPolicyResponse:
        policies = self._cp.policies
        out = q.GetPolicyResponse()
        cur = policies.current
        if cur is not None:
            text = cur.document.text
            admin = auth.current().may(auth.Role.ADMIN)
            out.policy_yaml = text if admin else auth.redact_policy(text)
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
        policies, events = self._cp.policies, self._cp.events
        who = auth.current().name
        running = policies.current.version if policies.current else 0
        try:
            if request.validate_only:
                doc, _ = compile_policy(request.policy_yaml)
                return q.SetPolicyResponse(
                    version=running, mode=_mode(doc.mode), rules=len(doc.rules)
                )
            accepted = accept_policy(policies, events, request.policy_yaml, "api", identity=who)
        except PolicyError as exc:
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
        try:
            return self._override(request, auth.current().name)
        except ControlError as exc:
            await context.abort(grpc.StatusCode[exc.status], str(exc))
            raise  # unreachable

    def _override(self, r: q.OverrideServiceRequest, who: str) -> q.OverrideServiceResponse:
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
            + (f" ({r.reason})" if r.reason else "")
            + f" by {who}",
            service=r.service,
            details={
                "identity": who,
                "action": action,
                "rule": r.rule,
                "level": r.level,
                "duration_seconds": r.duration_seconds,
                "reason": r.reason,
                "cleared": out.cleared,
            },
        )
        return out


def _mode(mode: str) -> q.PolicyMode:
    return cast(q.PolicyMode, q.PolicyMode.Value("POLICY_MODE_" + mode.upper()))


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
        # agent id -> name of the principal that writes it (sequences belong to it)
        self.agent_owners: dict[str, str] = {}
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

    def check_owner(self, agent_id: str, who: auth.Principal) -> None:
        """An agent id is written by the principal that first wrote it, no other (so one
        node cannot jam or poison another's sequence). Claims end when the store
        forgets the agent."""
        owner = self.agent_owners.get(agent_id)
        if owner is not None and owner != who.name:
            raise PermissionDenied(
                f"agent id {agent_id[:128]!r} belongs to another identity; {who.name} may "
                "only write agent ids of its own"
            )

    def _check_security(self, creds: grpc.ServerCredentials | None) -> None:
        cfg = self.config
        authn = self.authenticator
        if authn.rules and not cfg.tls_ca:
            raise ServerSetupError(
                "--client-role maps client certificates to roles, which needs mTLS: "
                "add --tls-cert, --tls-key and --tls-ca"
            )
        if is_loopback(cfg.listen):
            return
        if not authn.enabled:
            if not cfg.credentials.insecure:
                raise ServerSetupError(
                    f"refusing to listen on {cfg.listen} without authentication: anyone who "
                    "can reach it could set a policy (and run its actions) or feed it data. "
                    "Give tokens (--admin-token-file, --viewer-token-file, --agent-token-file) "
                    "and/or client certificate roles (--tls-ca with --client-role), listen "
                    "on loopback, or pass --insecure to accept the risk"
                )
            for line in (
                "*" * 72,
                f"INSECURE: listening on {cfg.listen} with authentication OFF (--insecure).",
                "Anyone who can reach this port can change the policy, trigger its actions",
                "(restarts, commands, webhooks, files) and read everything. Do not run it",
                "like this anywhere but an isolated test network.",
                "*" * 72,
            ):
                log.warning("%s", line)
        elif creds is None and authn.tokens:
            log.warning(
                "listening on %s without TLS: bearer tokens cross the network in plaintext; "
                "configure --tls-cert/--tls-key (and --tls-ca for mTLS)",
                cfg.listen,
            )

    async def start(self) -> str:
        """Bind and serve; returns the address actually bound ("host:port")."""
        cfg = self.config
        creds = server_credentials(cfg)
        self._check_security(creds)
        self._interceptor = auth.AuthInterceptor(self.authenticator)
        server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second control plane must not share the port
            ],
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
                lambda: view(self.store, self.events.last_id(), self.clock(), self.engine.engine),
            )
            self.metrics_address = self._metrics.address
        if cfg.evidence_listen and self.engine.engine.report_dir is not None:
            from goleash.control.evidence_http import EvidenceServer

            self._evidence = EvidenceServer(cfg.evidence_listen, self.engine.engine.report_dir)
            self.evidence_address = self._evidence.address
            if not is_loopback(cfg.evidence_listen):
                log.warning(
                    "evidence on %s is plain HTTP without authentication: anyone who can "
                    "reach it can read the flame graphs (function names, file paths); put it "
                    "behind an authenticating proxy",
                    self.evidence_address,
                )
        external = cfg.external_url or (
            f"http://{self.evidence_address}" if self.evidence_address else ""
        )
        self.engine.engine.external_url = external.rstrip("/")
        if cfg.otlp_endpoint:
            from goleash.control.metrics import control_registry, view
            from goleash.otlp import OtlpExporter

            registry = control_registry(
                asyncio.get_running_loop(),
                lambda: view(self.store, self.events.last_id(), self.clock(), self.engine.engine),
            )
            self._otlp = OtlpExporter(
                cfg.otlp_endpoint,
                registry,
                service_name="goleash-control-plane",
                interval=cfg.otlp_interval,
            ).start()
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
                for agent_id in [a for a in self.agent_owners if a not in self.store.agents]:
                    del self.agent_owners[agent_id]
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
