"""Who may call what: roles, credentials, and the one table of every RPC's role.

Three roles (DESIGN.md, failure model): `agent` writes ingest streams, `viewer` reads
(queries, events, the policy with its secrets redacted), `admin` changes the control
plane (policy, overrides) and may do everything a viewer may. An agent credential
reads nothing: a node that is taken over learns no more than it already sends.

A caller proves who it is with a bearer token (metadata `authorization: Bearer T`;
tokens per role come from files, Kubernetes Secrets mounted as files, or the
environment) or with a client certificate whose identity (a SAN URI, a SAN DNS name,
or the subject CN) maps to a role (`--client-role IDENTITY=ROLE`). A presented token
decides on its own: a wrong token is refused even on a connection with a good
certificate. Tokens are compared in constant time, against their SHA-256 digests so
that the comparison does not depend on the length either. Token files are re-read when they
change (a rotated Kubernetes Secret); an update that leaves one unusable is refused
and the previous tokens stay.

Authentication is off only when nothing is configured and the control plane listens
on loopback (`goleash run` stays zero-config), or when `--insecure` says so. Then
every caller is the one local principal with every role.

Every RPC the server serves is in RPC_ROLES (a test compares it with the services'
descriptors); a method missing from it is refused, not allowed.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import inspect
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from goleash.errors import GoleashError

log = logging.getLogger("goleash.control")


class Role(enum.Enum):
    AGENT = "agent"
    VIEWER = "viewer"
    ADMIN = "admin"


# What each role may act as (admin implies viewer; agent implies nothing else).
GRANTS: Mapping[Role, frozenset[Role]] = {
    Role.AGENT: frozenset({Role.AGENT}),
    Role.VIEWER: frozenset({Role.VIEWER}),
    Role.ADMIN: frozenset({Role.ADMIN, Role.VIEWER}),
}
OPEN = None  # an RPC anyone may call, authenticated or not

_G = "/goleash.v1.GoleashService/"
_HEALTH = "/grpc.health.v1.Health/"
# Every RPC of every service the API port serves, with the role it needs.
RPC_ROLES: Mapping[str, Role | None] = {
    # ingest: agents only
    "/goleash.v1.IngestService/StreamBatches": Role.AGENT,
    # queries and events: viewers (and admins)
    _G + "ListAgents": Role.VIEWER,
    _G + "ListProcesses": Role.VIEWER,
    _G + "GetGoroutineSummary": Role.VIEWER,
    _G + "ListGoroutines": Role.VIEWER,
    _G + "ListOrphans": Role.VIEWER,
    _G + "ListLeakSuspects": Role.VIEWER,
    _G + "GetFunctionLatency": Role.VIEWER,
    _G + "ListEvents": Role.VIEWER,
    _G + "WatchEvents": Role.VIEWER,
    _G + "ListDecisions": Role.VIEWER,
    # the running policy: viewers see it with secrets redacted, admins in full
    _G + "GetPolicy": Role.VIEWER,
    # changes: admins
    _G + "SetPolicy": Role.ADMIN,
    _G + "OverrideService": Role.ADMIN,
    # Health is open: load balancers and kubelet probes carry no credentials, and it
    # says nothing but SERVING/NOT_SERVING.
    _HEALTH + "Check": OPEN,
    _HEALTH + "Watch": OPEN,
    _HEALTH + "List": OPEN,
    # Reflection describes the API (no data), but it is still not for strangers.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.VIEWER,
}

MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: an HTTP/2 header value
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:/-]{0,127}")


class AuthSetupError(GoleashError):
    """Credentials that cannot be used as configured."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (for the audit trail) and what it may act as."""

    name: str
    roles: frozenset[Role]
    via: str  # "token", "certificate" or "unauthenticated"

    def may(self, role: Role | None) -> bool:
        return role is None or role in self.roles


# With authentication off (loopback with nothing configured, or --insecure).
LOCAL = Principal("local (authentication off)", frozenset(Role), "unauthenticated")
ANONYMOUS = Principal("anonymous", frozenset(), "unauthenticated")


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: Role
    digest: bytes


@dataclass(frozen=True)
class IdentityRule:
    """A certificate identity (exact, or a prefix ending in `*`) mapped to a role."""

    pattern: str
    role: Role

    def matches(self, identity: str) -> bool:
        if self.pattern.endswith("*"):
            return identity.startswith(self.pattern[:-1])
        return identity == self.pattern


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_token(token: str, where: str) -> str:
    """A token as sent: printable ASCII without spaces, long enough to resist guessing."""
    if not token:
        raise AuthSetupError(f"{where} is empty: give a token, or leave it unset")
    if not _TOKEN.fullmatch(token):
        raise AuthSetupError(f"{where}: a token is printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise AuthSetupError(
            f"{where}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(e.g. `openssl rand -hex 32`)"
        )
    return token


def read_token_file(path: str) -> list[tuple[str, str]]:
    """(name, token) per line of a token file: `TOKEN` or `NAME TOKEN`; blank lines and
    `#` comments are skipped. Several lines let a token be rotated without downtime."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthSetupError(f"cannot read the token file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise AuthSetupError(f"token file {path} is not text") from exc
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise AuthSetupError(f"{path}:{n}: expected `TOKEN` or `NAME TOKEN`")
        name = parts[0] if len(parts) == 2 else ""
        if name and not _NAME.fullmatch(name):
            raise AuthSetupError(f"{path}:{n}: name {name[:40]!r} is not [A-Za-z0-9._@:/-]")
        out.append((name, check_token(parts[-1], f"{path}:{n}")))
    if not out:
        raise AuthSetupError(f"token file {path} holds no token (an empty file is an error)")
    return out


def client_token(
    token: str | None = None,
    token_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """The one token a client sends: --token-file, else --token, else $GOLEASH_TOKEN.
    A set but empty source is an error, never "no token". A token file in the server's
    format may hold several lines while a token is rotated: the client sends the last
    (newest) one, so the server's and the clients' files can be the same Secret key."""
    if token_file is not None:
        return read_token_file(token_file)[-1][1]
    if token is not None:
        if not token or not _TOKEN.fullmatch(token):
            raise AuthSetupError("--token is empty or not printable ASCII without spaces")
        return token
    env = os.environ if env is None else env
    value = env.get("GOLEASH_TOKEN")
    if value is None:
        return None
    value = value.strip()
    if not value or not _TOKEN.fullmatch(value):
        raise AuthSetupError(
            "GOLEASH_TOKEN is set but empty (or not a token): unset it or give the token"
        )
    return value


def parse_identity_rule(text: str) -> IdentityRule:
    pattern, sep, role = text.rpartition("=")
    if not sep or not pattern:
        raise AuthSetupError(f"--client-role {text!r}: expected IDENTITY=ROLE")
    try:
        r = Role(role)
    except ValueError:
        raise AuthSetupError(
            f"--client-role {text!r}: role must be agent, viewer or admin"
        ) from None
    if pattern == "*":
        raise AuthSetupError("--client-role '*': map certificate identities, not every certificate")
    return IdentityRule(pattern, r)


ROLE_ENV = {Role.AGENT: "GOLEASH_AGENT_TOKEN", Role.VIEWER: "GOLEASH_VIEWER_TOKEN",
            Role.ADMIN: "GOLEASH_ADMIN_TOKEN"}  # fmt: skip


@dataclass
class AuthConfig:
    """Credentials the control plane accepts."""

    token_files: Mapping[Role, Sequence[str]] = field(default_factory=dict)
    tokens: Mapping[Role, Sequence[str]] = field(default_factory=dict)  # in-process (embedded)
    client_roles: Sequence[str] = ()  # IDENTITY=ROLE
    insecure: bool = False  # no authentication even off loopback (logged loudly)
    env: bool = True  # read GOLEASH_{AGENT,VIEWER,ADMIN}_TOKEN


class Authenticator:
    """Turns a call's metadata and peer certificate into a Principal."""

    def __init__(
        self,
        tokens: Sequence[TokenEntry],
        rules: Sequence[IdentityRule],
        files: Sequence[str] = (),
    ) -> None:
        self.tokens = tuple(tokens)
        self.rules = tuple(rules)
        self.enabled = bool(self.tokens or self.rules)
        self.files = tuple(files)  # token files, re-read when they change
        self.stamp = files_stamp(self.files)

    @classmethod
    def from_config(
        cls, cfg: AuthConfig, environ: Mapping[str, str] | None = None
    ) -> Authenticator:
        environ = os.environ if environ is None else environ
        entries: list[TokenEntry] = []
        seen: dict[bytes, str] = {}

        def add(name: str, role: Role, token: str, where: str) -> None:
            d = _digest(token)
            if d in seen:
                raise AuthSetupError(
                    f"{where}: the same token is also given as {seen[d]}; one token, one role"
                )
            seen[d] = where
            entries.append(TokenEntry(name, role, d))

        for role in Role:
            for path in cfg.token_files.get(role, ()):
                lines = read_token_file(path)
                for i, (name, token) in enumerate(lines, 1):
                    default = f"{role.value}-token" + (f"-{i}" if len(lines) > 1 else "")
                    add(name or default, role, token, f"{path} line {i}")
            for i, token in enumerate(cfg.tokens.get(role, ()), 1):
                add(f"{role.value}-in-process-{i}", role, check_token(token, role.value), "")
            if cfg.env and ROLE_ENV[role] in environ:
                var = ROLE_ENV[role]
                add(f"{role.value}-token", role, check_token(environ[var].strip(), var), var)
        rules = [parse_identity_rule(r) for r in cfg.client_roles]
        files = [p for role in Role for p in cfg.token_files.get(role, ())]
        return cls(entries, rules, files)

    def _token_principal(self, token: str) -> Principal | None:
        d = _digest(token)
        found = None
        for e in self.tokens:  # no early exit: the time does not tell which one matched
            if hmac.compare_digest(d, e.digest):
                found = e
        if found is None:
            return None
        return Principal(found.name, GRANTS[found.role], "token")

    def _cert_principal(self, auth_context: Mapping[str, Sequence[bytes]]) -> Principal | None:
        for identity in certificate_identities(auth_context):
            for rule in self.rules:
                if rule.matches(identity):
                    return Principal(identity, GRANTS[rule.role], "certificate")
        return None

    def authenticate(
        self, metadata: Sequence[tuple[str, Any]], auth_context: Mapping[str, Sequence[bytes]]
    ) -> Principal | None:
        """The caller, ANONYMOUS when it presented nothing; None when it presented a
        credential that is not valid (a wrong token, a malformed header)."""
        if not self.enabled:
            return LOCAL
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                if header is not None:
                    return None  # two authorization headers: ambiguous, refused
                header = value if isinstance(value, str) else value.decode("latin-1")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            return self._token_principal(token.strip())
        return self._cert_principal(auth_context) or ANONYMOUS


def files_stamp(paths: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced or rewritten (a Secret volume update)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def reloaded(current: Authenticator, cfg: AuthConfig) -> Authenticator:
    """`current`, or a new Authenticator when its token files changed on disk (a
    rotated Kubernetes Secret). Files that are now unusable (empty, unreadable) keep
    the current tokens, with an error in the log: never a silent "no token"."""
    stamp = files_stamp(current.files)
    if stamp == current.stamp:
        return current
    try:
        fresh = Authenticator.from_config(cfg)
    except AuthSetupError as exc:
        current.stamp = stamp  # one error per change, not one per check
        log.error("token files changed but cannot be used (%s); the previous tokens stay", exc)
        return current
    log.info("token files changed: %d token(s) now accepted", len(fresh.tokens))
    return fresh


def certificate_identities(auth_context: Mapping[str, Sequence[bytes]]) -> list[str]:
    """A verified client certificate's identities: SAN URIs, SAN DNS names, then the CN.
    Empty unless the connection is TLS with a client certificate (gRPC puts the peer's
    names in the auth context only after verifying the chain against --tls-ca)."""
    out: list[str] = []
    for key in ("peer_uri", "peer_dns", "x509_common_name"):
        for v in auth_context.get(key, ()):
            s = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            if s and s not in out:
                out.append(s)
    return out


# --- the interceptor ------------------------------------------------------------------

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("goleash_principal")


def current() -> Principal:
    """The principal of the RPC being handled (set by AuthInterceptor)."""
    return _current.get(ANONYMOUS)


class _DenialLog:
    """Refusals go to the process log, at most `per_minute` lines a minute (a client
    that hammers the port must not fill the disk); the rest are counted and summed up."""

    def __init__(self, per_minute: int = 20) -> None:
        self.per_minute = per_minute
        self.window = 0.0
        self.logged = 0
        self.suppressed = 0
        self.total = 0

    def __call__(self, message: str) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self.window >= 60:
            if self.suppressed:
                log.warning("%d more refused calls in the last minute", self.suppressed)
            self.window, self.logged, self.suppressed = now, 0, 0
        if self.logged < self.per_minute:
            self.logged += 1
            log.warning("%s", message)
        else:
            self.suppressed += 1


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call against RPC_ROLES before its handler runs."""

    def __init__(self, authenticator: Authenticator, roles: Mapping[str, Role | None] = RPC_ROLES):
        self.authn = authenticator
        self.roles = roles
        self.denied = _DenialLog()

    async def _check(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        needed = self.roles.get(method, "unlisted")
        if needed is OPEN:
            return ANONYMOUS if self.authn.enabled else LOCAL
        who = self.authn.authenticate(context.invocation_metadata() or (), context.auth_context())
        peer = context.peer()
        if needed == "unlisted":
            self.denied(f"refused {method} from {peer}: not in the RPC role table")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not served")
        if who is None:
            self.denied(f"refused {method} from {peer}: invalid credentials")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid credentials: the bearer token is not one this control plane accepts",
            )
        assert who is not None and isinstance(needed, Role)
        if who is ANONYMOUS:
            self.denied(f"refused {method} from {peer}: no credentials")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs the {needed.value} role: send 'authorization: Bearer TOKEN' "
                "(goleash: --token-file or $GOLEASH_TOKEN) or a client certificate mapped "
                "to a role",
            )
        if not who.may(needed):
            self.denied(f"refused {method} from {peer}: {who.name} is not {needed.value}")
            roles = ", ".join(sorted(r.value for r in who.roles)) or "none"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the {needed.value} role; {who.name} has: {roles}",
            )
        return who

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        check = self._check
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                _current.set(await check(method, context))
                out = inner(request, context)
                return await out if inspect.isawaitable(out) else out

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return make(
                unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            _current.set(await check(method, context))
            async for item in inner_stream(request, context):
                yield item

        async def written_response(request: Any, context: grpc.aio.ServicerContext) -> None:
            # handlers that write with context.write() (grpc's health Watch) return None
            _current.set(await check(method, context))
            out = inner_stream(request, context)
            if inspect.isawaitable(out):
                await out
            else:
                for item in out:
                    await context.write(item)

        wrapper: Any = (
            stream_response if inspect.isasyncgenfunction(inner_stream) else written_response
        )
        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# --- secrets in policy text ---------------------------------------------------------

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(
    r"(token|secret|password|passwd|authorization|api[-_]?key|credential|bearer|cookie)", re.I
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact_policy(text: str) -> str:
    """The policy text with secrets replaced by <redacted>, everything else (comments,
    layout) as written: every value under a `headers:` mapping, every value whose key
    names a secret (token, password, authorization, api_key, ...), and the user:password
    part of URLs. Text that does not parse is withheld whole: fail closed."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return f"# {REDACTED}: the policy text could not be parsed for redaction\n"
    spans: list[tuple[int, int, str]] = []

    def walk(node: Any, secret: bool) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else ""
                if k.lower() == "headers" and isinstance(value, yaml.MappingNode):
                    for _hk, hv in value.value:
                        walk(hv, True)
                else:
                    walk(value, secret or bool(_SECRET_KEY.search(str(k))))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, secret)
        elif isinstance(node, yaml.ScalarNode):
            start, end = node.start_mark.index, node.end_mark.index
            if secret:
                spans.append((start, end, f'"{REDACTED}"'))
            elif _URL_USERINFO.search(str(node.value)):
                raw = text[start:end]
                spans.append((start, end, _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", raw)))

    if root is not None:
        walk(root, False)
    out = text
    for start, end, repl in sorted(set(spans), reverse=True):  # aliases repeat a node
        out = out[:start] + repl + out[end:]
    return out


# --- secrets in events ----------------------------------------------------------------

_CREDENTIAL_WORDS = re.compile(r"\b(Bearer|Basic)\s+[\x21-\x7e]+", re.I)


def scrub(value: Any, key: str = "") -> Any:
    """An event's message or details without credentials: values under secret-sounding
    keys, header mappings, `Bearer ...`/`Basic ...` words and URL user:password parts
    are replaced. Events are for everyone with the viewer role."""
    if isinstance(value, str):
        if key and (_SECRET_KEY.search(key) or key.lower() == "headers"):
            return REDACTED
        value = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", value)
        return _CREDENTIAL_WORDS.sub(rf"\1 {REDACTED}", value)
    if isinstance(value, dict):
        if key.lower() == "headers":
            return {k: REDACTED for k in value}
        if key and _SECRET_KEY.search(key):
            return REDACTED
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, key) for v in value]
    return value
