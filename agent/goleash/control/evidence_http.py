"""The policy engine's evidence files over HTTP(S), so alerts link to them.

`GET /evidence/NAME` serves one file the engine wrote in its report directory: a
flame graph (`.svg`), folded stacks (`.folded`) or a pprof profile (`.pb.gz`).
Nothing else: no listing, no subdirectories, no symlinks, names from a strict
alphabet, so a link cannot be turned into a read of any other file. Alerts carry
`control-plane --external-url` + `/evidence/NAME` (generatorURL in Alertmanager).

Evidence is what an attacker wants (goroutine stacks, function names, file paths),
so it is guarded exactly as the gRPC read API (control/auth.py): the caller needs
the viewer role (admin includes it), by a bearer token (`Authorization: Bearer T`,
compared in constant time by the same Authenticator, token files re-read when they
change) or by a client certificate mapped to a role. TLS with the control plane's
certificate when it has one, client certificates required when it has a CA, as on
the gRPC port. With nothing configured it serves loopback only; another address
needs credentials or --insecure (logged loudly), the same rule as the gRPC port.

Errors say why in one line and carry no evidence: 401 without or with a bad
credential (before the name is even looked at: no oracle for which files exist),
403 for a role that may not read, 404 for anything that is not a served file.
Request heads are capped (URL, header bytes) and must arrive within a deadline,
connections are capped in number, files are streamed, and every response forbids
scripts, content sniffing and shared caching.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from goleash.control import auth
from goleash.control.transport import is_loopback  # one loopback rule for both ports
from goleash.errors import GoleashError

log = logging.getLogger("goleash.control")

TYPES = {
    ".svg": "image/svg+xml",
    ".folded": "text/plain; charset=utf-8",
    ".pb.gz": "application/octet-stream",
}
NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
MAX_BYTES = 64 << 20  # far above any flame graph the engine writes
CHUNK_BYTES = 64 << 10
MAX_REQUEST_LINE = 2048  # "GET /evidence/NAME HTTP/1.1": a name is at most 200 chars
MAX_HEAD_BYTES = 16 << 10  # every header line together
MAX_CONNECTIONS = 32  # one thread each; more are closed at once
TIMEOUT_SECONDS = 10.0  # per socket operation: a TLS handshake, a client that stops reading
HEAD_SECONDS = 5.0  # to send the whole request line and headers
RELOAD_SECONDS = 1.0  # token files and certificates are looked at no more often
NEEDED = auth.Role.VIEWER
# An SVG opened in a browser runs nothing and loads nothing (ours has no script, and a
# name from a traced process that carried markup is escaped; this is the second wall).
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; sandbox"),
    ("Cache-Control", "no-store"),  # private evidence: no shared cache keeps it
    ("Referrer-Policy", "no-referrer"),
)


class EvidenceListenError(GoleashError):
    pass


@dataclass(frozen=True)
class EvidenceAccess:
    """Who may read evidence: the control plane's own credentials and TLS files."""

    credentials: auth.AuthConfig = field(default_factory=lambda: auth.AuthConfig(env=False))
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # set: clients must present a certificate it signed

    @classmethod
    def of(cls, config: Any) -> EvidenceAccess:
        """The access rules of a ControlPlaneConfig (the gRPC API's)."""
        return cls(config.credentials, config.tls_cert, config.tls_key, config.tls_ca)


def _content_type(name: str) -> str | None:
    return next((t for suffix, t in TYPES.items() if name.endswith(suffix)), None)


class _TlsFiles:
    """The server's TLS context, rebuilt when its files change on disk (cert-manager
    renewals), as the gRPC port does; an unreadable update keeps the current one."""

    def __init__(self, cert: str, key: str, ca: str | None) -> None:
        self.cert, self.key, self.ca = cert, key, ca
        self.paths = tuple(p for p in (cert, key, ca) if p)
        self.stamp = auth.files_stamp(self.paths)
        self.current = self._build()
        self.checked = time.monotonic()
        self.lock = threading.Lock()

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(cafile=self.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise EvidenceListenError(
                f"evidence server: cannot use the TLS files ({self.cert}, {self.key}"
                + (f", {self.ca}" if self.ca else "")
                + f"): {exc}"
            ) from exc
        return ctx

    def context(self) -> ssl.SSLContext:
        with self.lock:
            now = time.monotonic()
            if now - self.checked < RELOAD_SECONDS:
                return self.current
            self.checked = now
            stamp = auth.files_stamp(self.paths)
            if stamp != self.stamp:
                self.stamp = stamp
                try:
                    self.current = self._build()
                    log.info("evidence server: TLS files changed, new connections use them")
                except EvidenceListenError as exc:
                    log.warning("%s; keeping the previous certificate", exc)
            return self.current


class _Tokens:
    """The Authenticator, re-read when its token files change (a rotated Secret)."""

    def __init__(self, credentials: auth.AuthConfig) -> None:
        self.credentials = credentials
        self.current = auth.Authenticator.from_config(credentials)
        self.checked = time.monotonic()
        self.lock = threading.Lock()

    def get(self) -> auth.Authenticator:
        with self.lock:
            now = time.monotonic()
            if now - self.checked >= RELOAD_SECONDS:
                self.checked = now
                self.current = auth.reloaded(self.current, self.credentials)
            return self.current


class _HeadTooLarge(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _read_head(sock: Any, deadline: float) -> bytes:
    """The request line and headers, read within `deadline` (time.monotonic) as a
    whole: a client that trickles a byte now and then (slowloris) is cut off at the
    deadline, not kept for as long as each byte comes before the socket timeout.
    Raises _HeadTooLarge (414 for the request line, 431 for the head) past the caps."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request head not complete in time")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        end = buf.find(b"\n", 0, MAX_REQUEST_LINE)
        if end < 0:
            if len(buf) >= MAX_REQUEST_LINE:
                raise _HeadTooLarge(414)
        elif len(buf[:end].split()) != 3:
            break  # not METHOD PATH VERSION (HTTP/0.9 sends no headers): refused as it is
        elif len(buf) > MAX_REQUEST_LINE + MAX_HEAD_BYTES:
            raise _HeadTooLarge(431)
    return bytes(buf)


def _peer_identities(sock: Any) -> dict[str, list[bytes]]:
    """A verified client certificate's names, in the gRPC auth context's keys."""
    getpeercert = getattr(sock, "getpeercert", None)
    cert = getpeercert() if getpeercert is not None else None
    if not cert:
        return {}
    out: dict[str, list[bytes]] = {"peer_uri": [], "peer_dns": [], "x509_common_name": []}
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            out["peer_uri"].append(value.encode())
        elif kind == "DNS":
            out["peer_dns"].append(value.encode())
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                out["x509_common_name"].append(value.encode())
    return out


def _cut(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst waits for accept(), not a SYN retry

    def __init__(
        self, address: tuple[str, int], tls: _TlsFiles | None, root: Path, tokens: _Tokens
    ) -> None:
        self.tls = tls
        self.root = root  # the report directory: the only files served
        self.tokens = tokens
        self.denied = auth._DenialLog()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused_connections = 0
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused_connections += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # in the connection's own thread: a stalled handshake holds one slot, not accept()
        request.settimeout(TIMEOUT_SECONDS)
        handler: Any = self.RequestHandlerClass
        if self.tls is None:
            handler(request, client_address, self)
            return
        # the handshake as a whole has HEAD_SECONDS: each of its reads has a timeout, but
        # a client trickling its hello byte by byte would renew that for hours
        twin = request.dup()  # the same connection: wrap_socket detaches `request`
        cutoff = threading.Timer(HEAD_SECONDS, _cut, (twin,))
        cutoff.daemon = True
        try:
            conn = self.tls.context().wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
            cutoff.start()
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.debug("evidence: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        finally:
            cutoff.cancel()
            twin.close()
        try:
            handler(conn, client_address, self)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that vanishes mid-response is no traceback on stderr
        log.debug("evidence: connection from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    server_version = "goleash-evidence"

    def version_string(self) -> str:  # no Python version for scanners
        return self.server_version

    protocol_version = "HTTP/1.0"  # one request per connection

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("evidence: " + fmt, *args)

    def handle_one_request(self) -> None:
        self.close_connection = True
        self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
        try:
            head = _read_head(self.connection, time.monotonic() + HEAD_SECONDS)
        except _HeadTooLarge as exc:
            return self.send_error(exc.status)
        except (TimeoutError, OSError):
            return
        self.connection.settimeout(TIMEOUT_SECONDS)
        line = head.split(b"\n", 1)[0]
        if not head:
            return
        if len(line.split()) != 3:  # HTTP/0.9 has no headers: no credentials
            return self._fail(400, "bad request line: METHOD PATH HTTP/1.x")
        self.rfile = io.BytesIO(head)  # what parse_request reads the headers from
        self.raw_requestline = self.rfile.readline()
        if not self.parse_request():
            return
        self._serve()

    def _serve(self) -> None:
        who = self._principal()
        if who is None:
            return
        if self.command != "GET":
            return self._fail(405, "only GET is served", (("Allow", "GET"),))
        path = self.path.split("?", 1)[0]
        name = path.removeprefix("/evidence/")
        ctype = _content_type(name)
        if name == path or not NAME.fullmatch(name) or ctype is None or ".." in name:
            return self._fail(404, "no such evidence")
        try:
            fd = os.open(self.server.root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return self._fail(404, "no such evidence")
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
                return self._fail(404, "no such evidence")
            # streamed: 32 clients of a large file must not hold it 32 times
            self._head(200, ctype, st.st_size)
            left = st.st_size
            with contextlib.suppress(OSError):  # the client went away
                while left > 0 and (chunk := f.read(min(CHUNK_BYTES, left))):
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def _principal(self) -> auth.Principal | None:
        """The caller with the viewer role, else None with 401/403 sent."""
        current = self.server.tokens.get()
        metadata = [("authorization", v) for v in self.headers.get_all("Authorization", [])]
        who = current.authenticate(metadata, _peer_identities(self.connection))
        peer = self.client_address[0]
        challenge = (("WWW-Authenticate", 'Bearer realm="goleash evidence"'),)
        if who is None:
            self.server.denied(f"evidence: refused {peer}: invalid credentials")
            self._fail(
                401,
                "invalid credentials: the bearer token is not one this control plane accepts",
                challenge,
            )
            return None
        if who is auth.ANONYMOUS:
            self.server.denied(f"evidence: refused {peer}: no credentials")
            self._fail(
                401,
                f"evidence needs the {NEEDED.value} role: send 'Authorization: Bearer "
                "TOKEN' (a viewer or admin token) or a client certificate mapped to "
                "a role",
                challenge,
            )
            return None
        if not who.may(NEEDED):
            self.server.denied(f"evidence: refused {peer}: {who.name} is not {NEEDED.value}")
            self._fail(403, f"evidence needs the {NEEDED.value} role")
            return None
        return who

    def send_error(self, code: int, message: str | None = None, explain: Any = None) -> None:
        # the parser's errors (400, 431, ...) as ours: short, plain, no echo
        self.close_connection = True
        reason = {431: "request header too large", 414: "request line too long"}
        self._fail(code, reason.get(code, "bad request"))

    def _fail(self, code: int, message: str, extra: Any = ()) -> None:
        self._send(code, "text/plain; charset=utf-8", (message + "\n").encode(), extra)

    def _send(self, code: int, ctype: str, body: bytes, extra: Any = ()) -> None:
        self._head(code, ctype, len(body), extra)
        with contextlib.suppress(OSError):  # the client went away
            self.wfile.write(body)

    def _head(self, code: int, ctype: str, length: int, extra: Any = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in (*SECURITY_HEADERS, *extra):
            self.send_header(k, v)
        self.end_headers()


class EvidenceServer:
    """A small threaded HTTP(S) server over `report_dir`; `address` is HOST:PORT.

    `access` is the control plane's credentials and TLS files (EvidenceAccess.of its
    config); None means none are configured, which only a loopback address allows."""

    def __init__(
        self, listen: str, report_dir: str | Path, access: EvidenceAccess | None = None
    ) -> None:
        access = access if access is not None else EvidenceAccess()
        host, _, port = listen.rpartition(":")
        tokens = _Tokens(access.credentials)
        authn = tokens.current
        self._check_security(listen, access, authn)
        tls = None
        if access.tls_cert or access.tls_key or access.tls_ca:
            if not (access.tls_cert and access.tls_key):
                raise EvidenceListenError(
                    "TLS needs both --tls-cert and --tls-key (--tls-ca adds mTLS)"
                )
            tls = _TlsFiles(access.tls_cert, access.tls_key, access.tls_ca)
        self.scheme = "https" if tls is not None else "http"
        try:
            self._server = _Server(
                (host.strip("[]") or "127.0.0.1", int(port)), tls, Path(report_dir), tokens
            )
        except (OSError, ValueError) as exc:
            raise EvidenceListenError(
                f"cannot listen on --evidence-listen {listen}: {exc}"
            ) from exc
        self.address = f"{host or '127.0.0.1'}:{self._server.server_port}"
        self.access_summary = f"{self.scheme}, " + (
            f"{len(authn.tokens)} token(s), {len(authn.rules)} certificate role(s)"
            if authn.enabled
            else "authentication off"
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="goleash-evidence", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _check_security(listen: str, access: EvidenceAccess, authn: auth.Authenticator) -> None:
        """The gRPC port's rule (transport.check_security), for this port."""
        if authn.rules and not access.tls_ca:
            raise EvidenceListenError(
                "--client-role maps client certificates to roles, which needs mTLS: "
                "add --tls-cert, --tls-key and --tls-ca"
            )
        if is_loopback(listen):
            return
        if not authn.enabled:
            if not access.credentials.insecure:
                raise EvidenceListenError(
                    f"refusing to serve evidence on {listen} without authentication: anyone "
                    "who can reach it could read goroutine stacks and file paths. Give tokens "
                    "(--viewer-token-file, --admin-token-file) and/or client certificate roles "
                    "(--tls-ca with --client-role), listen on loopback, or pass --insecure to "
                    "accept the risk"
                )
            for line in (
                "*" * 72,
                f"INSECURE: serving evidence on {listen} with authentication OFF (--insecure).",
                "Anyone who can reach this port can read goroutine stacks, function names",
                "and file paths of the traced services.",
                "*" * 72,
            ):
                log.warning("%s", line)
        elif not (access.tls_cert and access.tls_key) and authn.tokens:
            log.warning(
                "evidence on %s without TLS: bearer tokens cross the network in plaintext; "
                "configure --tls-cert/--tls-key",
                listen,
            )

    @property
    def refused_connections(self) -> int:
        return self._server.refused_connections

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
