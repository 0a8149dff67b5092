"""Hostile clients against a real `goleash control-plane` process, the identity half
(issue "Secure by default"): every RPC of the role table called with no, wrong and
each role's credentials, by token and by client certificate; refusals to start;
empty credentials; secrets redacted; one agent writing another's id; the audit trail.
Each refusal asserts its gRPC status and that policy, overrides, agents and the event
log did not change. No root needed: simulated agents over real loopback sockets."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from test_control_plane import GOLEASH, ControlPlaneProcess

from agentsim import SimAgent, process_info, snapshot
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.auth import GRANTS, OPEN, RPC_ROLES, Role

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKENS = {
    "admin": "admin-0123456789abcdef0123456789",
    "viewer": "viewer-0123456789abcdef012345678",
    "node-a": "agent-a-0123456789abcdef01234567",
    "node-b": "agent-b-0123456789abcdef01234567",
}
WRONG = "not-a-token-0123456789abcdef0123"
HOOK_SECRET = "hook-secret-5f1d8a"
POLICY = """\
mode: monitor
rules:
  - name: goroutines
    services: [shop]
    signal: {kind: goroutines, above: 100000}
    levels:
      - level: L3
        actions:
          - type: webhook
            url: "https://alert:pw-SECRET@hooks.example/alert"
            headers: {Authorization: "Bearer SECRET", X-Team: shop}
""".replace("SECRET", HOOK_SECRET)
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


# --- certificates ---------------------------------------------------------------------


@dataclass
class Issued:
    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CA:
    def __init__(self, cn: str) -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, sans: list[Any], usage: Any) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = CA("goleash test CA"), CA("rogue CA")
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    out: dict[str, Any] = {
        "dir": d,
        "ca": ca.pem,
        "server": ca.issue(
            "goleash-control-plane",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ExtendedKeyUsageOID.SERVER_AUTH,
        ),
        "agent": ca.issue(
            "goleash-agent", [x509.UniformResourceIdentifier("spiffe://goleash.test/agent")], client
        ),
        "admin": ca.issue(
            "goleash-admin", [x509.UniformResourceIdentifier("spiffe://goleash.test/admin")], client
        ),
        "viewer": ca.issue("goleash-viewer", [], client),  # mapped by its CN
        "stranger": ca.issue("stranger", [x509.DNSName("stranger.example")], client),
        "rogue": rogue.issue(
            "goleash-admin", [x509.UniformResourceIdentifier("spiffe://goleash.test/admin")], client
        ),
    }
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "server.crt").write_bytes(out["server"].cert)
    (d / "server.key").write_bytes(out["server"].key)
    return out


# --- control planes -------------------------------------------------------------------


def _token_files(d: Path) -> list[str]:
    (d / "admin").write_text(f"# rotated tokens may share a file\n{TOKENS['admin']}\n")
    (d / "viewer").write_text(TOKENS["viewer"])
    (d / "agent").write_text(f"node-a {TOKENS['node-a']}\nnode-b {TOKENS['node-b']}\n")
    return [
        *("--admin-token-file", str(d / "admin")),
        *("--viewer-token-file", str(d / "viewer")),
        *("--agent-token-file", str(d / "agent")),
    ]


@pytest.fixture(scope="module")
def token_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    d = tmp_path_factory.mktemp("token-plane")
    cp = ControlPlaneProcess(d / "goleash.db", *_token_files(d))
    yield cp
    cp.stop()


@pytest.fixture(scope="module")
def mtls_plane(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]
) -> Iterator[ControlPlaneProcess]:
    d, p = tmp_path_factory.mktemp("mtls-plane"), pki["dir"]
    cp = ControlPlaneProcess(
        d / "goleash.db",
        *("--tls-cert", str(p / "server.crt"), "--tls-key", str(p / "server.key")),
        *("--tls-ca", str(p / "ca.crt")),
        *("--client-role", "spiffe://goleash.test/agent=agent"),
        *("--client-role", "spiffe://goleash.test/admin=admin"),
        *("--client-role", "goleash-viewer=viewer"),
    )
    yield cp
    cp.stop()


def bearer(who: str) -> tuple[tuple[str, str], ...]:
    if who == "none":
        return ()
    return (("authorization", f"Bearer {WRONG if who == 'wrong' else TOKENS[who]}"),)


def mtls_channel(cp: ControlPlaneProcess, pki: dict[str, Any], who: str | None) -> grpc.Channel:
    issued = pki.get(who) if who else None
    creds = grpc.ssl_channel_credentials(
        pki["ca"],
        issued.key if issued else None,
        issued.cert if issued else None,
    )
    return grpc.secure_channel(cp.address, creds)


# --- calling any RPC of the table ---------------------------------------------------

_SERVICES = {
    s.full_name: s
    for s in (
        q.DESCRIPTOR.services_by_name["GoleashService"],
        ing.DESCRIPTOR.services_by_name["IngestService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
}


def every_rpc() -> list[str]:
    return sorted(f"/{name}/{m.name}" for name, s in _SERVICES.items() for m in s.methods)


_seq = iter(range(1, 1_000_000))


def request_for(method: str, caller: str) -> Any:
    """A harmless request: nothing it could change (validate-only policy, override of a
    service nobody knows), except ingest, whose batches go to an agent id of the
    caller's own."""
    if method.endswith("/SetPolicy"):
        return q.SetPolicyRequest(policy_yaml=POLICY, validate_only=True)
    if method.endswith("/OverrideService"):
        return q.OverrideServiceRequest(service="nobody", action=q.OVERRIDE_ACTION_CLEAR)
    if method.endswith("/StreamBatches"):
        a = SimAgent(f"walk-{caller}-{next(_seq)}")
        return [ing.StreamBatchesRequest(batch=a.batch())]
    if method.endswith("/ServerReflectionInfo"):
        return [reflection_pb2.ServerReflectionRequest(list_services="")]
    service, name = method.strip("/").split("/")
    m = _SERVICES[service].methods_by_name[name]
    return message_factory.GetMessageClass(m.input_type)()


def call(channel: grpc.Channel, method: str, request: Any, md: Any) -> grpc.StatusCode:
    """The call's status (OK included); a server stream counts as let in once it is
    still open at the deadline."""
    service, name = method.strip("/").split("/")
    m = _SERVICES[service].methods_by_name[name]
    out_cls = message_factory.GetMessageClass(m.output_type)
    kw = {
        "request_serializer": lambda r: r.SerializeToString(),
        "response_deserializer": out_cls.FromString,
    }
    try:
        if m.client_streaming and m.server_streaming:
            for _ in channel.stream_stream(method, **kw)(iter(request), metadata=md, timeout=5):
                break
        elif m.client_streaming:
            channel.stream_unary(method, **kw)(iter(request), metadata=md, timeout=5)
        elif m.server_streaming:
            for _ in channel.unary_stream(method, **kw)(request, metadata=md, timeout=0.5):
                break
        else:
            channel.unary_unary(method, **kw)(request, metadata=md, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def expected(method: str, role: Role | None) -> str:
    """ "in" (let past authorisation), or the refusal's status name."""
    needed = RPC_ROLES[method]
    if needed is OPEN:
        return "in"
    if role is None:
        return "UNAUTHENTICATED"
    return "in" if needed in GRANTS[role] else "PERMISSION_DENIED"


def outcome(code: grpc.StatusCode) -> str:
    return code.name if code in DENIED else "in"


# --- state that must not change -------------------------------------------------------


def state(channel: grpc.Channel, md: Any) -> dict[str, Any]:
    api = q_grpc.GoleashServiceStub(channel)
    pol = api.GetPolicy(q.GetPolicyRequest(), metadata=md)
    events = api.ListEvents(q.ListEventsRequest(page_size=1000), metadata=md).events
    agents = api.ListAgents(q.ListAgentsRequest(), metadata=md).agents
    return {
        "policy": (pol.version, pol.policy_yaml, [o.id for o in pol.overrides]),
        "events": [(e.id, e.kind, e.message) for e in events],
        "agents": sorted((a.identity.agent_id, a.last_sequence, a.batches) for a in agents),
    }


def walk_agents(s: dict[str, Any]) -> dict[str, Any]:
    """State without what the walk's own ingest calls add (agents named walk-*)."""
    return {
        "policy": s["policy"],
        "events": [e for e in s["events"] if "walk-" not in e[2]],
        "agents": [a for a in s["agents"] if not a[0].startswith("walk-")],
    }


# --- the walks ------------------------------------------------------------------------


def test_the_role_table_lists_every_rpc_the_server_serves(
    token_plane: ControlPlaneProcess,
) -> None:
    assert sorted(RPC_ROLES) == every_rpc()
    # ... and the services the running server announces are exactly those
    with grpc.insecure_channel(token_plane.address) as ch:
        stub = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda r: r.SerializeToString(),
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub(iter([req]), metadata=bearer("viewer"), timeout=5))
    served = {s.name for s in resp.list_services_response.service}
    assert served == set(_SERVICES)


def test_every_rpc_with_no_wrong_and_each_roles_token(token_plane: ControlPlaneProcess) -> None:
    callers = {"none": None, "wrong": None, "node-a": Role.AGENT, "viewer": Role.VIEWER,
               "admin": Role.ADMIN}  # fmt: skip
    with grpc.insecure_channel(token_plane.address) as ch:
        before = walk_agents(state(ch, bearer("admin")))
        got, want = {}, {}
        for method in every_rpc():
            for who, role in callers.items():
                code = call(ch, method, request_for(method, who), bearer(who))
                got[(method, who)] = outcome(code)
                want[(method, who)] = expected(method, role)
                # a let-in call still answers sensibly (no crash, no UNKNOWN)
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                    method,
                    who,
                )
        after = walk_agents(state(ch, bearer("admin")))
    assert len(got) >= 80
    assert got == want
    assert after == before  # nothing changed but the let-in agents' own walk-* streams


def test_every_rpc_with_each_client_certificate(
    mtls_plane: ControlPlaneProcess, pki: dict[str, Any]
) -> None:
    callers = {"stranger": None, "agent": Role.AGENT, "viewer": Role.VIEWER, "admin": Role.ADMIN}
    admin = mtls_channel(mtls_plane, pki, "admin")
    before = walk_agents(state(admin, ()))
    n = 0
    for who, role in callers.items():
        with mtls_channel(mtls_plane, pki, who) as ch:
            for method in every_rpc():
                code = call(ch, method, request_for(method, who), ())
                assert outcome(code) == expected(method, role), (who, method, code)
                n += 1
    # No certificate, or one from another CA (even naming the admin identity): the
    # TLS handshake fails, nothing is served at all.
    for who in (None, "rogue"):
        with mtls_channel(mtls_plane, pki, who) as ch:
            for method in ("/goleash.v1.GoleashService/SetPolicy", "/grpc.health.v1.Health/Check"):
                code = call(ch, method, request_for(method, str(who)), ())
                assert code == grpc.StatusCode.UNAVAILABLE, (who, method, code)
                n += 1
    # the server's own certificate is not a client identity (separate certificates)
    server_as_client = grpc.ssl_channel_credentials(
        pki["ca"], pki["server"].key, pki["server"].cert
    )
    with grpc.secure_channel(mtls_plane.address, server_as_client) as ch:
        code = call(ch, "/goleash.v1.GoleashService/ListAgents", q.ListAgentsRequest(), ())
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
    # a wrong token is refused even on a connection with the admin certificate
    code = call(
        admin, "/goleash.v1.GoleashService/ListAgents", q.ListAgentsRequest(), bearer("wrong")
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert walk_agents(state(admin, ())) == before
    admin.close()
    assert n >= 70


def test_malformed_authorization_headers_are_refused(token_plane: ControlPlaneProcess) -> None:
    good = f"Bearer {TOKENS['viewer']}"
    with grpc.insecure_channel(token_plane.address) as ch:
        api = q_grpc.GoleashServiceStub(ch)
        for md in (
            (("authorization", f"Basic {TOKENS['viewer']}"),),
            (("authorization", "Bearer"),),
            (("authorization", good), ("authorization", good)),  # two: ambiguous
            (("authorization", f"Bearer {TOKENS['viewer'][:-1]}"),),  # a prefix
            (("authorization", f"Bearer {TOKENS['viewer']}x"),),
        ):
            with pytest.raises(grpc.RpcError) as info:
                api.ListAgents(q.ListAgentsRequest(), metadata=md, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
        # the scheme is case-insensitive (RFC 7235)
        api.ListAgents(
            q.ListAgentsRequest(), metadata=(("authorization", good.lower()[:7] + good[7:]),)
        )


# --- ownership of agent ids -----------------------------------------------------------


def _stream(ch: grpc.Channel, who: str, batches: list[ing.AgentBatch]) -> grpc.StatusCode:
    reqs = [ing.StreamBatchesRequest(batch=b) for b in batches]
    return call(ch, "/goleash.v1.IngestService/StreamBatches", reqs, bearer(who))


def test_an_agent_cannot_write_another_agents_id(token_plane: ControlPlaneProcess) -> None:
    with grpc.insecure_channel(token_plane.address) as ch:
        a = SimAgent("node-a-agent", "node-a")
        assert _stream(ch, "node-a", [a.batch(appeared=[process_info(10, "shop")])]) == (
            grpc.StatusCode.OK
        )
        before = state(ch, bearer("admin"))
        # node-b, a valid agent credential, poses as node-a: a normal batch, a jam at
        # sequence 2^64-1, a restart (new instance) that would reset node-a's sequence
        forged = SimAgent("node-a-agent", "node-a")
        for batch in (
            forged.batch(snapshots=[snapshot(10, goroutines=100_000)]),
            forged.batch(sequence=2**64 - 1),
            SimAgent("node-a-agent").batch(appeared=[process_info(11, "victim")]),
        ):
            assert _stream(ch, "node-b", [batch]) == grpc.StatusCode.PERMISSION_DENIED
        # a viewer or an admin cannot write at all (ingest is the agent role's)
        for who in ("viewer", "admin"):
            assert _stream(ch, who, [forged.batch()]) == grpc.StatusCode.PERMISSION_DENIED
        assert state(ch, bearer("admin")) == before
        # node-a itself goes on as before
        assert _stream(ch, "node-a", [a.batch()]) == grpc.StatusCode.OK
        agents = (
            q_grpc.GoleashServiceStub(ch)
            .ListAgents(q.ListAgentsRequest(), metadata=bearer("viewer"))
            .agents
        )
        assert {x.identity.agent_id: x.last_sequence for x in agents}["node-a-agent"] == 2


# A sender stopped while gRPC's connectivity poller still ran killed that thread
# ("Channel closed!"): the warning is an error here.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_agents_sender_presents_its_token_and_keeps_batches_when_refused(
    token_plane: ControlPlaneProcess,
) -> None:
    """The node agent's own sender (goleash.node.sender): with its token the batches
    arrive; with a wrong one the control plane refuses the stream and the agent keeps
    the batches (bounded) for when its credentials are fixed, instead of dropping them
    as rejected data. Its stop leaves no thread of gRPC's to die after it."""
    from goleash.node.sender import BatchBuffer, IngestSender, SenderOptions
    from polling import wait_for

    channel = grpc.insecure_channel(token_plane.address)
    api = q_grpc.GoleashServiceStub(channel)

    def sequence_of(agent_id: str) -> int:
        agents = api.ListAgents(q.ListAgentsRequest(), metadata=bearer("viewer")).agents
        return next((a.last_sequence for a in agents if a.identity.agent_id == agent_id), 0)

    for who, token in (("good", TOKENS["node-a"]), ("bad", WRONG)):
        buf = BatchBuffer(max_batches=10)
        a = SimAgent(f"sender-{who}")
        for _ in range(3):
            buf.put(a.batch(appeared=[process_info(3, "shop")]), ())
        sender = IngestSender(
            SenderOptions(token_plane.address, token=token, backoff_initial_s=0.1),
            buf,
            inflight_s=1.0,
        )
        sender.start()
        try:
            if who == "good":
                wait_for(lambda: sequence_of("sender-good") == 3, "the three batches")
            else:
                stats = sender.stats
                wait_for(lambda s=stats: "UNAUTHENTICATED" in s.last_error, "the refusal")
                assert sequence_of("sender-bad") == 0
                assert len(buf) == 3 and "batches_rejected" not in buf.drop_counts()
        finally:
            sender.stop()
    channel.close()


def test_goleash_run_gives_its_own_agent_a_token_only_when_authentication_is_on(
    tmp_path: Path,
) -> None:
    """`goleash run`: zero-config on loopback; with people's tokens configured the
    embedded agent streams with an agent token made for the process, over the same
    real gRPC port a remote agent uses."""
    from goleash.control.auth import AuthConfig
    from goleash.control.server import ControlPlaneConfig
    from goleash.embedded import EmbeddedControlPlane, embedded_agent_token

    assert embedded_agent_token(ControlPlaneConfig(listen="127.0.0.1:0")) is None
    (tmp_path / "admin").write_text(TOKENS["admin"])
    cfg = ControlPlaneConfig(
        listen="127.0.0.1:0",
        db=str(tmp_path),
        credentials=AuthConfig(token_files={Role.ADMIN: [str(tmp_path / "admin")]}, env=False),
    )
    own = embedded_agent_token(cfg)
    assert own and own not in TOKENS.values()
    cp = EmbeddedControlPlane(cfg)
    cp.start()
    try:
        with grpc.insecure_channel(cp.address) as ch:
            a = SimAgent("embedded")
            batch = [ing.StreamBatchesRequest(batch=a.batch(appeared=[process_info(1, "x")]))]
            method = "/goleash.v1.IngestService/StreamBatches"
            md = (("authorization", f"Bearer {own}"),)
            assert call(ch, method, batch, md) == grpc.StatusCode.OK
            assert call(ch, method, batch, ()) == grpc.StatusCode.UNAUTHENTICATED
            # the made-up token is an agent's only: it reads nothing
            assert call(ch, "/goleash.v1.GoleashService/ListAgents", q.ListAgentsRequest(), md) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
    finally:
        cp.stop()


# --- secrets and the audit trail ------------------------------------------------------


def test_policy_secrets_redacted_for_viewers_and_never_in_events(
    token_plane: ControlPlaneProcess,
) -> None:
    with grpc.insecure_channel(token_plane.address) as ch:
        api = q_grpc.GoleashServiceStub(ch)
        version = api.SetPolicy(q.SetPolicyRequest(policy_yaml=POLICY), metadata=bearer("admin"))
        assert version.version >= 1
        # a rejected policy quoting a secret: refused, and the secret stays out of the log
        bad = POLICY.replace("mode: monitor", f"mode: {HOOK_SECRET}")
        with pytest.raises(grpc.RpcError) as info:
            api.SetPolicy(q.SetPolicyRequest(policy_yaml=bad), metadata=bearer("admin"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        full = api.GetPolicy(q.GetPolicyRequest(), metadata=bearer("admin")).policy_yaml
        assert full == POLICY
        seen = api.GetPolicy(q.GetPolicyRequest(), metadata=bearer("viewer")).policy_yaml
        assert HOOK_SECRET not in seen and "<redacted>" in seen
        # the rest is kept as written: a viewer still reads what the policy does
        assert "X-Team" in seen and "hooks.example/alert" in seen and "above: 100000" in seen
        events = api.ListEvents(q.ListEventsRequest(page_size=1000), metadata=bearer("viewer"))
        text = json.dumps([str(e) for e in events.events])
        assert HOOK_SECRET not in text
        for token in (*TOKENS.values(), WRONG):
            assert token not in text
        audit = [e for e in events.events if e.kind in (t.EVENT_KIND_POLICY_SET,
                                                        t.EVENT_KIND_POLICY_REJECTED)]  # fmt: skip
        assert audit and all(e.details["identity"] == "admin-token" for e in audit)
        assert all("admin-token" in e.message for e in audit)


def test_every_change_is_an_event_naming_who_made_it(
    mtls_plane: ControlPlaneProcess, pki: dict[str, Any]
) -> None:
    with mtls_channel(mtls_plane, pki, "agent") as ch:
        a = SimAgent("audited", "node-x")
        reqs = [ing.StreamBatchesRequest(batch=a.batch(appeared=[process_info(5, "shop")]))]
        assert call(ch, "/goleash.v1.IngestService/StreamBatches", reqs, ()) == grpc.StatusCode.OK
    with mtls_channel(mtls_plane, pki, "admin") as ch:
        api = q_grpc.GoleashServiceStub(ch)
        last = api.ListEvents(q.ListEventsRequest(newest_first=True, page_size=1)).events
        after = last[0].id if last else 0
        api.SetPolicy(q.SetPolicyRequest(policy_yaml=POLICY))
        degrade = q.OverrideServiceRequest(
            service="shop", action=q.OVERRIDE_ACTION_FORCE_DEGRADE, reason="drill"
        )
        api.OverrideService(degrade)
        api.OverrideService(
            q.OverrideServiceRequest(service="shop", action=q.OVERRIDE_ACTION_CLEAR)
        )
        new = api.ListEvents(q.ListEventsRequest(after_id=after, page_size=100)).events
    changes = [e for e in new if e.kind in (t.EVENT_KIND_POLICY_SET, t.EVENT_KIND_OVERRIDE)]
    assert [e.kind for e in changes] == [
        t.EVENT_KIND_POLICY_SET,
        t.EVENT_KIND_OVERRIDE,
        t.EVENT_KIND_OVERRIDE,
    ]
    for e in changes:
        assert e.details["identity"] == "spiffe://goleash.test/admin"
        assert "spiffe://goleash.test/admin" in e.message


def test_a_renewed_server_certificate_is_used_without_a_restart(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    """cert-manager renews in place: the control plane serves new connections with the
    files now on disk (here the renewal even comes from another CA, so a client that
    trusts only the new one tells which certificate it got)."""
    from polling import wait_for

    p = pki["dir"]
    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    crt.write_bytes(pki["server"].cert)
    key.write_bytes(pki["server"].key)
    cp = ControlPlaneProcess(
        tmp_path / "goleash.db",
        *("--tls-cert", str(crt), "--tls-key", str(key), "--tls-ca", str(p / "ca.crt")),
        *("--client-role", "goleash-viewer=viewer"),
    )
    try:
        renewed_ca = CA("renewed CA")
        renewed = renewed_ca.issue(
            "goleash-control-plane",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ExtendedKeyUsageOID.SERVER_AUTH,
        )
        viewer = pki["viewer"]

        def list_agents(trust: bytes) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(trust, viewer.key, viewer.cert)
            with grpc.secure_channel(cp.address, creds) as ch:
                return call(ch, "/goleash.v1.GoleashService/ListAgents", q.ListAgentsRequest(), ())

        assert list_agents(pki["ca"]) == grpc.StatusCode.OK
        assert list_agents(renewed_ca.pem) == grpc.StatusCode.UNAVAILABLE
        # Kubernetes swaps a Secret volume's files at once; here: write aside, rename
        for path, data in ((key, renewed.key), (crt, renewed.cert)):
            path.with_name(path.name + ".new").write_bytes(data)
        for path in (key, crt):
            os.replace(path.with_name(path.name + ".new"), path)
        assert list_agents(renewed_ca.pem) == grpc.StatusCode.OK
        # the server logs before that handshake; its stderr is read by another thread
        wait_for(
            lambda: any("TLS certificate files changed" in x for x in cp.stderr),
            "the renewal in the log",
            10,
        )
    finally:
        cp.stop()


def test_a_rotated_token_file_takes_effect_without_a_restart(tmp_path: Path) -> None:
    from polling import wait_for

    f = tmp_path / "viewer"
    f.write_text(TOKENS["viewer"] + "\n")
    cp = ControlPlaneProcess(tmp_path / "goleash.db", "--viewer-token-file", str(f))
    new = "rotated-0123456789abcdef0123456789"
    try:
        with grpc.insecure_channel(cp.address) as ch:

            def status(token: str) -> grpc.StatusCode:
                md = (("authorization", f"Bearer {token}"),)
                return call(ch, "/goleash.v1.GoleashService/ListAgents", q.ListAgentsRequest(), md)

            assert status(TOKENS["viewer"]) == grpc.StatusCode.OK
            (tmp_path / "next").write_text(f"new {new}\n")
            os.replace(tmp_path / "next", f)  # as a Secret volume update does
            wait_for(lambda: status(new) == grpc.StatusCode.OK, "the new token", 20)
            assert status(TOKENS["viewer"]) == grpc.StatusCode.UNAUTHENTICATED
            (tmp_path / "next").write_text("")  # a broken update changes nothing
            os.replace(tmp_path / "next", f)
            wait_for(lambda: any("cannot be used" in x for x in cp.stderr), "the error", 20)
            assert status(new) == grpc.StatusCode.OK
    finally:
        cp.stop()


# --- refusing to start, empty credentials ---------------------------------------------


def _goleash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GOLEASH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--listen", "0.0.0.0:0"], {}, "refusing to listen on 0.0.0.0:0 without authentication"),
        (["--listen", "[::]:0"], {}, "refusing to listen"),
        (["--listen", "0.0.0.0:0", "--client-role", "x=admin"], {}, "needs mTLS"),
        (["--admin-token-file", "{empty}"], {}, "holds no token"),
        (["--admin-token-file", "{blank}"], {}, "holds no token"),
        (["--admin-token-file", "{short}"], {}, "at least 16"),
        (["--admin-token-file", "/nonexistent/token"], {}, "cannot read the token file"),
        ([], {"GOLEASH_ADMIN_TOKEN": ""}, "GOLEASH_ADMIN_TOKEN is empty"),
        (
            ["--admin-token-file", "{same}", "--viewer-token-file", "{same}"],
            {},
            "one token, one role",
        ),
        (["--client-role", "x=root"], {}, "role must be agent, viewer or admin"),
    ],
)
def test_control_plane_refuses_to_start(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    files = {"empty": "", "blank": "\n  \n# only a comment\n", "short": "abc\n",
             "same": TOKENS["admin"]}  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [a.format(**{n: str(tmp_path / n) for n in files}) for a in args]
    r = _goleash("control-plane", "--db", str(tmp_path / "db"), *argv, env=env)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_insecure_serves_off_loopback_and_says_so_loudly(tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "goleash.db", "--insecure", listen="0.0.0.0:0")
    try:
        log = "".join(cp.stderr)
        assert "INSECURE" in log and "authentication OFF" in log
    finally:
        assert cp.stop() == 0


def test_clients_refuse_empty_credentials(token_plane: ControlPlaneProcess, tmp_path: Path) -> None:
    server = ("--server", token_plane.address)
    r = _goleash("ps", *server, env={"GOLEASH_TOKEN": ""})
    assert r.returncode == 2 and "GOLEASH_TOKEN is set but empty" in r.stderr
    (tmp_path / "empty").write_text("")
    r = _goleash("ps", *server, "--token-file", str(tmp_path / "empty"))
    assert r.returncode == 2 and "holds no token" in r.stderr
    # the right file works; the viewer may read but not change
    (tmp_path / "viewer").write_text(TOKENS["viewer"] + "\n")
    r = _goleash("agents", *server, "--token-file", str(tmp_path / "viewer"), "--json")
    assert r.returncode == 0, r.stderr
    (tmp_path / "policy.yaml").write_text(POLICY)
    r = _goleash(
        "policy",
        "set",
        str(tmp_path / "policy.yaml"),
        *server,
        "--token-file",
        str(tmp_path / "viewer"),
    )
    assert r.returncode == 2 and "permission denied" in r.stderr and "admin" in r.stderr
    r = _goleash("ps", *server)
    assert r.returncode == 2 and "did not accept these credentials" in r.stderr
