"""Hostile clients against the evidence server of a real `goleash control-plane`
process (`--evidence-listen`): evidence (goroutine stacks, function names, file paths)
is read with the viewer role only, by token or client certificate, over TLS when the
control plane has it; traversal, oversized heads and other methods are refused with
nothing served; a function name carrying markup stays text in the flame graph.
Each refusal asserts its status and that no evidence byte is in the answer and no
file changed. No root needed: a simulated agent over real loopback sockets."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from test_control_plane import GOLEASH, ControlPlaneProcess

from agentsim import SimAgent, goroutine, process_info, site, snapshot, stream
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from polling import wait_for

TOKENS = {
    "admin": "admin-0123456789abcdef0123456789",
    "viewer": "viewer-0123456789abcdef012345678",
    "agent": "agent-0123456789abcdef012345678x",
}
WRONG = "not-a-token-0123456789abcdef0123"
SECRET = "main.secretFunction;/srv/app/secret.go"  # what no refused request may see
MARKUP = "main.<script>alert(1)</script>"
POLICY = """\
mode: monitor
evaluation_interval: 200ms
rules:
  - name: too-many
    services: [shop]
    signal: {kind: goroutines, above: 10}
    sustain: {consecutive: 1}
    levels:
      - level: L3
        actions: [{type: file, path: "/nonexistent/flag"}]
"""


def _token_args(d: Path) -> list[str]:
    out = []
    for role, token in TOKENS.items():
        (d / role).write_text(token + "\n")
        out += [f"--{role}-token-file", str(d / role)]
    return out


def _evidence_address(cp: ControlPlaneProcess) -> str:
    (address,) = [m[1] for x in cp.stderr if (m := re.search(r"evidence on (\S+),", x))]
    return address


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


class Plane:
    def __init__(self, d: Path, *extra: str, listen: str = "127.0.0.1:0") -> None:
        self.dir = d
        self.reports = d / "reports"
        self.reports.mkdir()
        (self.reports / "known.svg").write_text(f"<svg><text>{SECRET}</text></svg>")
        (self.reports / "known.folded").write_text(f"{SECRET} 3\n")
        (d / "outside.svg").write_text(f"<svg>{SECRET}</svg>")
        (self.reports / "link.svg").symlink_to(d / "outside.svg")
        (d / "policy.yaml").write_text(POLICY)
        self.cp = ControlPlaneProcess(
            d / "goleash.db",
            *extra,
            *("--policy", str(d / "policy.yaml")),
            *("--evidence-listen", listen),
        )
        try:
            self.evidence = _evidence_address(self.cp)
        except BaseException:
            self.cp.stop()  # never leave a control plane behind
            raise
        host, port = self.evidence.rsplit(":", 1)
        self.host = "127.0.0.1" if host == "0.0.0.0" else host
        self.port = int(port)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    d = tmp_path_factory.mktemp("evidence-plane")
    p = Plane(d, *_token_args(d))
    yield p
    assert p.cp.stop() == 0


def get(
    p: Plane, path: str, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(p.host, p.port, timeout=10)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    conn.request("GET", path, headers=h)
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read())
    conn.close()
    return out


def raw(p: Plane, data: bytes) -> bytes:
    """Send bytes as they are; everything the server answers before it closes."""
    with socket.create_connection((p.host, p.port), timeout=10) as s:
        with contextlib.suppress(OSError):  # it may close before reading all: a refusal
            s.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # a refusal too
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def assert_nothing_served(body: bytes) -> None:
    assert SECRET.encode() not in body and b"<svg" not in body
    assert len(body) < 300  # one line saying why, nothing more


# --- credentials ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "headers", "status"),
    [
        ("none", {}, 401),
        ("wrong token", {"Authorization": f"Bearer {WRONG}"}, 401),
        ("basic", {"Authorization": "Basic YWRtaW46YWRtaW4="}, 401),
        ("empty bearer", {"Authorization": "Bearer "}, 401),
        ("agent token", {"Authorization": f"Bearer {TOKENS['agent']}"}, 403),
    ],
)
def test_evidence_without_a_reading_role_is_refused(
    plane: Plane, who: str, headers: dict[str, str], status: int
) -> None:
    before = _files(plane.reports)
    for path in ("/evidence/known.svg", "/evidence/known.folded", "/evidence/missing.svg"):
        code, h, body = get(plane, path, headers=headers)
        # the same answer for a file that exists and one that does not: no oracle
        assert code == status, (who, path)
        assert_nothing_served(body)
        assert h["X-Content-Type-Options"] == "nosniff"
        if status == 401:
            assert h["WWW-Authenticate"].startswith("Bearer")
            assert b"Authorization: Bearer" in body or b"invalid credentials" in body
    assert _files(plane.reports) == before


def test_two_authorization_headers_are_refused(plane: Plane) -> None:
    request = (
        "GET /evidence/known.svg HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKENS['viewer']}\r\nAuthorization: Bearer {WRONG}\r\n\r\n"
    )
    answer = raw(plane, request.encode())
    assert answer.startswith(b"HTTP/1.0 401 ")
    assert_nothing_served(answer.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("role", ["viewer", "admin"])
def test_a_reading_role_gets_the_evidence_with_safe_headers(plane: Plane, role: str) -> None:
    code, h, body = get(plane, "/evidence/known.svg", TOKENS[role])
    assert code == 200 and SECRET.encode() in body
    assert h["Content-Type"] == "image/svg+xml"
    assert h["X-Content-Type-Options"] == "nosniff"
    csp = h["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "script" not in csp
    assert h["Cache-Control"] == "no-store"
    code, h, body = get(plane, "/evidence/known.folded", TOKENS[role])
    assert code == 200 and body == f"{SECRET} 3\n".encode()


def test_a_large_profile_comes_whole(plane: Plane) -> None:
    data = os.urandom(3 << 20)
    (plane.reports / "big.pb.gz").write_bytes(data)
    try:
        code, h, body = get(plane, "/evidence/big.pb.gz", TOKENS["viewer"])
        assert code == 200 and body == data
        assert h["Content-Type"] == "application/octet-stream"
    finally:
        (plane.reports / "big.pb.gz").unlink()


def test_a_credential_of_raw_bytes_is_refused_not_a_crash(plane: Plane) -> None:
    for value in (b"Bearer \xff\xfe" + b"\x80" * 40, b"Bearer " + b"\x00" * 20, b"\xff" * 100):
        answer = raw(
            plane, b"GET /evidence/known.svg HTTP/1.1\r\nAuthorization: " + value + b"\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.0 401 ") or answer.startswith(b"HTTP/1.0 400 "), answer[
            :40
        ]
        assert SECRET.encode() not in answer
    assert get(plane, "/evidence/known.folded", TOKENS["viewer"])[0] == 200


# --- traversal and other paths --------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/evidence/link.svg",  # a symlink out of the report directory
        "/evidence/../outside.svg",
        "/evidence/..%2foutside.svg",
        "/evidence/%2e%2e%2foutside.svg",
        "/evidence/%2e%2e/outside.svg",
        "/evidence//etc/passwd",
        "/evidence/reports/../../outside.svg",
        "/evidence/..\\outside.svg",
        "/evidence/known.svg%00.svg",
        "/evidence/known.svg/",
        "/evidence/",
        "/evidence",
        "/",
        "/reports/known.svg",
        "/evidence/goleash.db",
        "http://evil/evidence/../outside.svg",
    ],
)
def test_traversal_and_other_paths_serve_nothing(plane: Plane, path: str) -> None:
    before = _files(plane.reports)
    code, h, body = get(plane, path, TOKENS["viewer"])
    assert code == 404, path
    assert_nothing_served(body)
    assert _files(plane.reports) == before


def test_other_methods_are_refused(plane: Plane) -> None:
    before = _files(plane.reports)
    for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS"):
        conn = http.client.HTTPConnection(plane.host, plane.port, timeout=10)
        conn.request(
            method,
            "/evidence/known.svg",
            body=b"<svg>overwritten</svg>",
            headers={"Authorization": f"Bearer {TOKENS['admin']}"},
        )
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 405, method
        assert r.getheader("Allow") == "GET"
        assert_nothing_served(body)
        # without credentials the method is not even looked at
        conn = http.client.HTTPConnection(plane.host, plane.port, timeout=10)
        conn.request(method, "/evidence/known.svg", body=b"x")
        assert conn.getresponse().status == 401
        conn.close()
    assert _files(plane.reports) == before


# --- oversized requests ---------------------------------------------------------------


def test_oversized_requests_are_refused_and_the_server_keeps_serving(plane: Plane) -> None:
    token = TOKENS["viewer"]
    auth = f"Authorization: Bearer {token}\r\n".encode()
    # a 1 MB header
    answer = raw(
        plane,
        b"GET /evidence/known.svg HTTP/1.1\r\n"
        + auth
        + b"X-Big: "
        + b"a" * 1_000_000
        + b"\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.0 431 ")
    assert_nothing_served(answer.split(b"\r\n\r\n", 1)[1])
    # many small headers summing over the cap
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(500))
    answer = raw(plane, b"GET /evidence/known.svg HTTP/1.1\r\n" + auth + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 431 ")
    assert_nothing_served(answer.split(b"\r\n\r\n", 1)[1])
    # a 100 kB URL
    answer = raw(plane, b"GET /evidence/" + b"a" * 100_000 + b".svg HTTP/1.1\r\n" + auth + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 414 ")
    # HTTP/0.9 carries no header, so no credential
    answer = raw(plane, b"GET /evidence/known.svg\r\n")
    assert answer.startswith(b"HTTP/1.0 400 ") and SECRET.encode() not in answer
    # garbage
    answer = raw(
        plane, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100 + b"\r\n\r\n"
    )
    assert SECRET.encode() not in answer
    # and the next honest reader is served
    code, _, body = get(plane, "/evidence/known.folded", token)
    assert code == 200 and body == f"{SECRET} 3\n".encode()
    assert plane.cp.proc.poll() is None


def test_connections_beyond_the_cap_are_closed_and_slots_come_back(plane: Plane) -> None:
    from goleash.control.evidence_http import MAX_CONNECTIONS

    idle = [
        socket.create_connection((plane.host, plane.port), timeout=10)
        for _ in range(MAX_CONNECTIONS)
    ]
    try:
        # each idle connection holds its thread; the next one is closed at once, unread
        answer = raw(
            plane,
            b"GET /evidence/known.folded HTTP/1.1\r\nAuthorization: Bearer "
            + TOKENS["viewer"].encode()
            + b"\r\n\r\n",
        )
        assert answer == b""
    finally:
        for s in idle:
            s.close()

    def served() -> bool:
        try:
            return get(plane, "/evidence/known.folded", TOKENS["viewer"])[0] == 200
        except (ConnectionError, http.client.HTTPException):
            return False

    wait_for(served, "the evidence server to serve again once idle clients left", timeout=15)


def test_a_trickling_client_is_cut_off_at_the_head_deadline(plane: Plane) -> None:
    from goleash.control.evidence_http import HEAD_SECONDS

    began = time.monotonic()
    with socket.create_connection((plane.host, plane.port), timeout=10) as s:
        s.sendall(b"GET /evidence/known.folded HTTP/1.1\r\nX-Slow: ")
        s.settimeout(0.5)
        closed = False
        while not closed and time.monotonic() - began < HEAD_SECONDS + 5:
            try:
                s.sendall(b"a")  # a byte well within any per-read timeout
                closed = s.recv(100) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
    took = time.monotonic() - began
    assert closed and HEAD_SECONDS - 0.5 <= took < HEAD_SECONDS + 4, took


# --- the evidence the engine writes -----------------------------------------------------


def test_a_decision_links_evidence_a_viewer_fetches_and_markup_in_names_stays_text(
    plane: Plane,
) -> None:
    agent = SimAgent("node-x")
    evil_go = "/src/<img src=x onerror=alert(2)>.go:7"
    kept = [goroutine(100 + i, MARKUP, evil_go, age=60.0 + i) for i in range(3)]
    with grpc.insecure_channel(plane.cp.address) as ch:
        stream(
            ch,
            [
                agent.batch(
                    appeared=[process_info(42, "shop")],
                    snapshots=[
                        snapshot(
                            42,
                            [site(MARKUP, evil_go, live=50, created=50, creator="main.<b>x</b>")],
                            kept=kept,
                        )
                    ],
                )
            ],
            token=TOKENS["agent"],
        )
        viewer = (("authorization", f"Bearer {TOKENS['viewer']}"),)
        stub = q_grpc.GoleashServiceStub(ch)

        def decision() -> Any:
            resp = stub.ListDecisions(q.ListDecisionsRequest(service="shop"), metadata=viewer)
            for e in resp.decisions:
                d = json_format.MessageToDict(e.details)
                links = d.get("evidence", {}).get("links", {})
                if "flamegraph_svg" in links:
                    return links
            return None

        links = wait_for(decision, "a degrade decision with evidence links", timeout=30)
    base = f"http://{plane.evidence}/evidence/"
    assert links["flamegraph_svg"].startswith(base)
    path = links["flamegraph_svg"].removeprefix(f"http://{plane.evidence}")
    # the link as a stranger and as the agent sees it: nothing
    assert get(plane, path)[0] == 401
    assert get(plane, path, TOKENS["agent"])[0] == 403
    code, h, body = get(plane, path, TOKENS["viewer"])
    assert code == 200 and h["Content-Type"] == "image/svg+xml"
    svg = ET.fromstring(body)  # well-formed XML
    tags = {el.tag.rsplit("}", 1)[-1] for el in svg.iter()}
    assert tags <= {"svg", "rect", "g", "title", "text"}, tags  # no script, img, b
    texts = "".join(el.text or "" for el in svg.iter())
    assert MARKUP in texts  # the name is shown, as text
    assert b"<script" not in body and b"<img" not in body
    code, _, folded = get(
        plane, links["flamegraph_folded"].removeprefix(f"http://{plane.evidence}"), TOKENS["viewer"]
    )
    assert code == 200 and MARKUP.encode() in folded


# --- refusing to start ------------------------------------------------------------------


def test_evidence_off_loopback_without_credentials_is_refused(tmp_path: Path) -> None:
    r = subprocess.run(
        [*GOLEASH, "control-plane", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "g.db")]
        + ["--evidence-listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "refusing to serve evidence on 0.0.0.0:0 without authentication" in r.stderr
    assert "--insecure" in r.stderr and "Traceback" not in r.stderr


def test_evidence_without_an_event_log_file_is_a_clear_error() -> None:
    r = subprocess.run(
        [*GOLEASH, "control-plane", "--listen", "127.0.0.1:0", "--db", ":memory:"]
        + ["--evidence-listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "give --db a file" in r.stderr and "Traceback" not in r.stderr


def test_evidence_off_loopback_with_insecure_serves_and_says_so(tmp_path: Path) -> None:
    p = Plane(tmp_path, "--insecure", listen="0.0.0.0:0")
    try:
        assert any("INSECURE: serving evidence on 0.0.0.0:0" in x for x in p.cp.stderr)
        code, _, body = get(p, "/evidence/known.folded")
        assert code == 200 and body == f"{SECRET} 3\n".encode()
    finally:
        p.cp.stop()


def test_tokens_on_loopback_are_required_as_on_the_grpc_port(plane: Plane) -> None:
    # loopback, but credentials are configured: the evidence is not open to local users
    assert get(plane, "/evidence/known.svg")[0] == 401


def test_a_rotated_viewer_token_is_taken_without_a_restart(plane: Plane) -> None:
    f, old, new = plane.dir / "viewer", TOKENS["viewer"], "viewer-rotated-0123456789abcdef"

    def status(token: str) -> int:
        return get(plane, "/evidence/known.folded", token)[0]

    try:
        f.write_text(f"{old}\n{new}\n")
        wait_for(lambda: status(new) == 200, "the new token to be accepted", timeout=15)
        assert status(old) == 200
        f.write_text(f"{new}\n")
        wait_for(lambda: status(old) == 401, "the old token to be refused", timeout=15)
    finally:
        f.write_text(f"{old}\n")
        wait_for(lambda: status(old) == 200, "the original token back", timeout=15)


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from test_hostile_auth import CA

    d = tmp_path_factory.mktemp("evidence-pki")
    ca, rogue = CA("evidence test CA"), CA("rogue CA")
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    server = ca.issue(
        "goleash-control-plane",
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    out: dict[str, Any] = {"dir": d, "ca": d / "ca.crt"}
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "server.crt").write_bytes(server.cert)
    (d / "server.key").write_bytes(server.key)
    for who, issuer, uri in (
        ("viewer", ca, "spiffe://goleash.test/viewer"),
        ("admin", ca, "spiffe://goleash.test/admin"),
        ("agent", ca, "spiffe://goleash.test/agent"),
        ("stranger", ca, "spiffe://goleash.test/stranger"),
        ("rogue", rogue, "spiffe://goleash.test/admin"),
    ):
        issued = issuer.issue(f"goleash-{who}", [x509.UniformResourceIdentifier(uri)], client)
        (d / f"{who}.crt").write_bytes(issued.cert)
        (d / f"{who}.key").write_bytes(issued.key)
    return out


def _tls_args(pki: dict[str, Any], *, mtls: bool) -> list[str]:
    d = pki["dir"]
    out = ["--tls-cert", str(d / "server.crt"), "--tls-key", str(d / "server.key")]
    if mtls:
        out += ["--tls-ca", str(pki["ca"])]
        for role in ("viewer", "admin", "agent"):
            out += ["--client-role", f"spiffe://goleash.test/{role}={role}"]
    return out


@pytest.fixture(scope="module")
def mtls_plane(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]) -> Iterator[Plane]:
    d = tmp_path_factory.mktemp("evidence-mtls")
    p = Plane(d, *_tls_args(pki, mtls=True), *_token_args(d))
    yield p
    assert p.cp.stop() == 0


def tls_get(
    p: Plane, pki: dict[str, Any], cert: str | None, token: str | None = None
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        d = pki["dir"]
        ctx.load_cert_chain(d / f"{cert}.crt", d / f"{cert}.key")
    conn = http.client.HTTPSConnection(p.host, p.port, timeout=10, context=ctx)
    try:
        conn.request(
            "GET",
            "/evidence/known.folded",
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("cert", "token", "status"),
    [
        ("viewer", None, 200),
        ("admin", None, 200),
        ("agent", None, 403),
        ("stranger", None, 401),  # signed by the CA, mapped to no role
        ("viewer", WRONG, 401),  # a presented token decides, as on the gRPC port
        ("agent", TOKENS["viewer"], 200),
        ("stranger", TOKENS["agent"], 403),
    ],
)
def test_mtls_evidence_by_certificate_and_token(
    mtls_plane: Plane, pki: dict[str, Any], cert: str, token: str | None, status: int
) -> None:
    assert any(re.search(r"evidence on \S+, https,", x) for x in mtls_plane.cp.stderr)
    code, body = tls_get(mtls_plane, pki, cert, token)
    assert code == status
    if status == 200:
        assert body == f"{SECRET} 3\n".encode()
    else:
        assert_nothing_served(body)


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_mtls_evidence_without_a_ca_signed_certificate_gets_no_connection(
    mtls_plane: Plane, pki: dict[str, Any], cert: str | None
) -> None:
    # as on the gRPC port: with --tls-ca every client presents a certificate it signed,
    # even one that carries a good token
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        tls_get(mtls_plane, pki, cert, TOKENS["viewer"])
    assert mtls_plane.cp.proc.poll() is None


def test_plain_http_to_the_tls_evidence_port_gets_nothing(mtls_plane: Plane) -> None:
    answer = raw(
        mtls_plane,
        f"GET /evidence/known.folded HTTP/1.1\r\nAuthorization: Bearer {TOKENS['viewer']}"
        "\r\n\r\n".encode(),
    )
    assert SECRET.encode() not in answer and b"200 OK" not in answer


def test_a_trickled_tls_hello_is_cut_off_at_the_head_deadline(mtls_plane: Plane) -> None:
    from goleash.control.evidence_http import HEAD_SECONDS

    hello = bytes.fromhex("16030100c8010000c40303") + os.urandom(32)  # a hello's start
    began = time.monotonic()
    with socket.create_connection((mtls_plane.host, mtls_plane.port), timeout=10) as s:
        s.settimeout(0.5)
        closed = False
        for byte in hello * 10:
            if closed or time.monotonic() - began > HEAD_SECONDS + 5:
                break
            try:
                s.sendall(bytes([byte]))
                closed = s.recv(100) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
    took = time.monotonic() - began
    assert closed and HEAD_SECONDS - 0.5 <= took < HEAD_SECONDS + 4, took
    assert mtls_plane.cp.proc.poll() is None


def test_tls_with_tokens_serves_https_to_a_viewer_token_only(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    p = Plane(tmp_path, *_tls_args(pki, mtls=False), *_token_args(tmp_path))
    try:
        assert tls_get(p, pki, None)[0] == 401
        assert tls_get(p, pki, None, TOKENS["agent"])[0] == 403
        code, body = tls_get(p, pki, None, TOKENS["viewer"])
        assert code == 200 and body == f"{SECRET} 3\n".encode()
    finally:
        assert p.cp.stop() == 0
