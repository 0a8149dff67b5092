"""`goleash control-plane` as a real process on a real port, fed by simulated agents
(tests/agentsim.py: the ingest contract the node agent implements) and queried over
real gRPC channels and through the `goleash` CLI."""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentsim import SimAgent, goroutine, process_info, site, snapshot, stream
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.histogram import bucket_bounds, bucket_index
from polling import wait_for

BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]
LEAK = ("main.handler.func1", "/src/shop/main.go:42")
POOL = ("main.worker", "/src/shop/pool.go:17")
ADMIN = "admin-token-0123456789abcdef"
VIEWER = "viewer-token-0123456789abcdef"
AGENT = "agent-token-0123456789abcdef"
POLICY = "mode: monitor\nrules:\n  - name: goroutines\n    signal: {kind: goroutines}\n"


class ControlPlaneProcess:
    """`goleash control-plane` in a subprocess; `address` once it listens."""

    def __init__(self, db: Path, *extra: str, listen: str = "127.0.0.1:0") -> None:
        self.proc = subprocess.Popen(
            [*GOLEASH, "control-plane", "--listen", listen, "--db", str(db), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.address = ""
        self.stderr: list[str] = []
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr.append(line)
            if "listening on " in line:
                self.address = line.split("listening on ", 1)[1].split()[0]
                break
        if not self.address:
            self.proc.kill()
            raise AssertionError(f"control plane did not start: {''.join(self.stderr)}")
        # keep draining stderr so the child never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "goleash.db")  # loopback, no credentials: all open
    yield cp
    cp.stop()


@pytest.fixture
def channel(control_plane: ControlPlaneProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(control_plane.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*GOLEASH, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def status_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


FAST = [800_000 + 2_000 * i for i in range(495)]  # 0.8 .. 1.8 ms
SLOW = [250_000_000] * 5  # 250 ms: the top 1 %


def feed_shop(channel: grpc.Channel) -> tuple[SimAgent, SimAgent]:
    """Two agents, three processes of two services, with a leak, orphans and a pool."""
    a, b = SimAgent("agent-a", "node-a"), SimAgent("agent-b", "node-b")
    leak_kept = [
        goroutine(100 + i, *LEAK, age=120 - i, blocked=119 - i, orphan=True) for i in range(3)
    ]
    kept_1001 = [*leak_kept, goroutine(9, *POOL, age=600, reason="select")]
    batches_a = [
        a.batch(appeared=[process_info(1001, "shop"), process_info(1002, "shop")]),
        a.batch(
            snapshots=[
                snapshot(
                    1001,
                    [
                        site(
                            *LEAK,
                            live=40,
                            created=40,
                            oldest=120,
                            orphans=30,
                            orphan_oldest=120,
                            orphan_reason="chan receive",
                        ),
                        site(*POOL, live=16, created=16, oldest=600, waits={"select": 16}),
                    ],
                    kept=kept_1001,
                    latency={"main.callBackend": FAST},
                    panics={"main.handler": 2},
                ),
                snapshot(
                    1002,
                    [site(*POOL, live=16, created=16, oldest=600)],
                    latency={"main.callBackend": SLOW},
                ),
            ]
        ),
    ]
    dup = batches_a[1]
    batches_a.append(dup)  # resent after a (pretend) reconnect: ignored
    a.sequence += 1  # one batch lost on the way: a gap of 1
    batches_a.append(
        a.batch(
            snapshots=[
                snapshot(
                    1001,
                    [
                        site(
                            *LEAK,
                            live=40,
                            oldest=125,
                            orphans=30,
                            orphan_oldest=125,
                            orphan_reason="chan receive",
                        ),
                        site(*POOL, live=16, oldest=605),
                    ],
                    kept=kept_1001,
                )
            ]
        )
    )
    resp = stream(channel, batches_a)
    assert (resp.accepted, resp.duplicates, resp.gaps, resp.last_sequence) == (3, 1, 1, 4)
    batches_b = [
        b.batch(appeared=[process_info(2001, "cart"), process_info(2002, "shop")]),
        b.batch(
            snapshots=[
                snapshot(
                    2001,
                    [
                        site(
                            "main.consume",
                            "/src/cart/q.go:9",
                            live=4,
                            created=6,
                            exited=2,
                            oldest=30,
                        )
                    ],
                ),
                snapshot(
                    2002,
                    [
                        site(
                            *LEAK,
                            live=10,
                            created=10,
                            oldest=300,
                            orphans=5,
                            orphan_oldest=300,
                            orphan_reason="select",
                        )
                    ],
                    kept=[goroutine(77, *LEAK, age=300, blocked=299, orphan=True, reason="select")],
                ),
            ]
        ),
        b.batch(gone=[(2001, process_info(2001, "cart").start_time_unix_nano, "exited")]),
    ]
    assert stream(channel, batches_b).accepted == 3
    return a, b


def test_health_serving_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "goleash.v1.GoleashService", "goleash.v1.IngestService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"goleash.v1.GoleashService", "goleash.v1.IngestService", "grpc.health.v1.Health"} <= (
        names
    )


def test_two_agents_feed_one_control_plane_and_every_query_answers(
    channel: grpc.Channel,
) -> None:
    api = q_grpc.GoleashServiceStub(channel)
    watched: list[t.Event] = []
    # from_start: replay the log, then follow live; ids make the seam seamless
    watch = api.WatchEvents(q.WatchEventsRequest(from_start=True))

    def follow() -> None:
        try:
            watched.extend(r.event for r in watch)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED  # we hang up below

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    feed_shop(channel)

    agents = {x.identity.agent_id: x for x in api.ListAgents(q.ListAgentsRequest()).agents}
    assert set(agents) == {"agent-a", "agent-b"}
    a = agents["agent-a"]
    assert (a.batches, a.duplicates, a.gaps, a.last_sequence) == (3, 1, 1, 4)
    assert a.identity.node_name == "node-a" and a.processes == 2
    assert a.state == q.AGENT_STATE_DISCONNECTED  # its stream ended
    assert agents["agent-b"].processes == 1  # 2001 went away

    procs = api.ListProcesses(q.ListProcessesRequest()).processes
    assert sorted((p.info.service, p.info.pid) for p in procs) == [
        ("shop", 1001),
        ("shop", 1002),
        ("shop", 2002),
    ]
    p1001 = next(p for p in procs if p.info.pid == 1001)
    assert (p1001.goroutines, p1001.created, p1001.orphans, p1001.panics) == (56, 56, 30, 2)
    assert p1001.node_name == "node-a" and p1001.state == q.PROCESS_STATE_RUNNING
    gone = api.ListProcesses(q.ListProcessesRequest(include_gone=True)).processes
    assert [(p.info.pid, p.gone_reason) for p in gone if p.state == q.PROCESS_STATE_GONE] == [
        (2001, "exited")
    ]

    summary = api.GetGoroutineSummary(q.GetGoroutineSummaryRequest(window_seconds=60))
    assert (summary.processes, summary.goroutines, summary.orphans) == (3, 82, 35)
    sites = {(s.service, s.function): s for s in summary.sites}
    leak = sites[("shop", LEAK[0])]
    assert (leak.live, leak.created, leak.processes, leak.orphans) == (50, 50, 2, 35)
    assert sites[("shop", POOL[0])].live == 32
    assert sites[("cart", "main.consume")].live == 0  # its process is gone ...
    assert sites[("cart", "main.consume")].created == 6  # ... but its past is in the window
    assert 60 <= summary.window_seconds <= 65

    groups = api.ListOrphans(q.ListOrphansRequest()).groups
    assert [(g.service, g.function, g.go_statement, g.count) for g in groups] == [
        ("shop", *LEAK, 35)
    ]
    (g,) = groups
    assert g.oldest_age_seconds == 300 and g.reason == "chan receive" and g.processes == 2
    assert g.example.goroutine.goid == 77 and g.example.goroutine.stack[1].function == LEAK[0]

    page1 = api.ListGoroutines(q.ListGoroutinesRequest(orphans_only=True, page_size=2))
    page2 = api.ListGoroutines(
        q.ListGoroutinesRequest(orphans_only=True, page_size=2, page_token=page1.next_page_token)
    )
    ages = [r.goroutine.age_seconds for r in [*page1.goroutines, *page2.goroutines]]
    assert page1.total_size == 4 and not page2.next_page_token
    assert ages == [300, 120, 119, 118]
    parked = api.ListGoroutines(
        q.ListGoroutinesRequest(site="pool.go:17", state=t.GOROUTINE_STATE_WAITING)
    )
    assert [(r.pid, r.goroutine.goid) for r in parked.goroutines] == [(1001, 9)]

    lat = api.GetFunctionLatency(
        q.GetFunctionLatencyRequest(function="main.callBackend", quantiles=[0.5, 0.995])
    )
    assert lat.count == 500 and lat.processes == 2
    p50, p995 = (x.value_seconds for x in lat.quantiles)
    lo, hi = bucket_bounds(bucket_index(sorted(FAST)[249], 3), 3)
    assert lo * 1e-9 <= p50 <= hi * 1e-9
    lo, hi = bucket_bounds(bucket_index(SLOW[0], 3), 3)
    assert lo * 1e-9 <= p995 <= hi * 1e-9
    one = api.GetFunctionLatency(
        q.GetFunctionLatencyRequest(
            function="main.callBackend", selector=q.ProcessSelector(agent_id="agent-a", pid=1002)
        )
    )
    assert one.count == 5 and one.processes == 1

    suspects = api.ListLeakSuspects(q.ListLeakSuspectsRequest())
    assert not suspects.suspects  # seconds of history: no opinion yet (tests/unit cover it)

    kinds = [e.kind for e in api.ListEvents(q.ListEventsRequest(page_size=1000)).events]
    assert kinds.count(t.EVENT_KIND_PROCESS_APPEARED) == 4
    assert kinds.count(t.EVENT_KIND_PROCESS_GONE) == 1
    assert kinds.count(t.EVENT_KIND_ORPHANS_APPEARED) == 2
    assert kinds.count(t.EVENT_KIND_AGENT_SEQUENCE_GAP) == 1
    assert kinds.count(t.EVENT_KIND_PANICS) == 1
    wait_for(lambda: len(watched) >= len(kinds), "the watcher to see every event")
    watch.cancel()
    assert [e.kind for e in watched] == kinds  # in order, nothing missed, nothing twice


def test_cli_reads_the_control_plane(
    control_plane: ControlPlaneProcess, channel: grpc.Channel
) -> None:
    feed_shop(channel)
    server = ("--server", control_plane.address)
    groups = json.loads(cli("orphans", "--json", *server).stdout)
    assert len(groups) == 1
    g = groups[0]
    assert (g["function"], g["go_statement"], g["count"], g["reason"]) == (
        *LEAK,
        35,
        "chan receive",
    )
    assert g["oldest_age_s"] == 300 and g["service"] == "shop"
    assert cli("orphans", "--fail-if-any", *server, check=False).returncode == 1
    assert LEAK[0] in cli("orphans", *server).stdout

    ps = json.loads(cli("ps", "--json", *server).stdout)
    assert sorted(p["pid"] for p in ps) == [1001, 1002, 2002]
    assert "shop" in cli("ps", *server).stdout

    agents = json.loads(cli("agents", "--json", *server).stdout)
    assert {x["agent_id"]: x["gaps"] for x in agents} == {"agent-a": 1, "agent-b": 0}

    frame = cli("top", "--once", *server).stdout
    assert "goroutines 82" in frame and LEAK[0] in frame and "node-a" in frame
    snap = json.loads(cli("top", "--json", *server).stdout)
    assert snap["totals"]["orphans"] == 35 and len(snap["processes"]) == 3

    events = json.loads(cli("events", "--json", "--kind", "process_gone", *server).stdout)
    assert [(e["kind"], e["pid"]) for e in events] == [("process_gone", 2001)]
    # resume after the newest event: whatever happens from here on is streamed, even what
    # happens before the follower has connected
    api = q_grpc.GoleashServiceStub(channel)
    last = api.ListEvents(q.ListEventsRequest(newest_first=True, page_size=1)).events[0].id
    follow = subprocess.Popen(
        [
            *GOLEASH,
            "events",
            "--follow",
            "--json",
            "--kind",
            "agent_connected",
            *server,
            "--after-id",
            str(last),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        stream(channel, [SimAgent("agent-c").batch()])
        assert follow.stdout is not None
        ready, _, _ = select.select([follow.stdout], [], [], 30)
        assert ready, "goleash events --follow printed nothing"
        event = json.loads(follow.stdout.readline())
        assert (event["kind"], event["agent_id"]) == ("agent_connected", "agent-c")
        assert event["id"] > last
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=10) == 0


def test_malformed_and_oversized_requests_get_the_right_status(channel: grpc.Channel) -> None:
    feed_shop(channel)
    api = q_grpc.GoleashServiceStub(channel)
    invalid = [
        lambda: api.ListGoroutines(q.ListGoroutinesRequest(min_age_seconds=-1)),
        lambda: api.ListGoroutines(q.ListGoroutinesRequest(state=42)),
        lambda: api.ListGoroutines(q.ListGoroutinesRequest(page_token="garbage")),
        lambda: api.ListProcesses(q.ListProcessesRequest(window_seconds=86400)),
        lambda: api.GetFunctionLatency(q.GetFunctionLatencyRequest()),
        lambda: api.GetFunctionLatency(
            q.GetFunctionLatencyRequest(function="main.callBackend", quantiles=[2])
        ),
        lambda: api.ListEvents(q.ListEventsRequest(filter=q.EventFilter(kinds=[999]))),
        lambda: list(api.WatchEvents(q.WatchEventsRequest(filter=q.EventFilter(kinds=[999])))),
        lambda: stream(channel, [SimAgent("").batch()]),
        lambda: stream(channel, [SimAgent("x").batch(sequence=0)]),
    ]
    for call in invalid:
        assert status_of(call) == grpc.StatusCode.INVALID_ARGUMENT
    not_found = [
        lambda: api.ListOrphans(q.ListOrphansRequest(selector=q.ProcessSelector(service="nope"))),
        lambda: api.GetFunctionLatency(q.GetFunctionLatencyRequest(function="main.unknown")),
        lambda: api.ListProcesses(q.ListProcessesRequest(selector=q.ProcessSelector(pid=4))),
    ]
    for call in not_found:
        assert status_of(call) == grpc.StatusCode.NOT_FOUND
    huge = "x" * (9 * 1024 * 1024)  # over the default 8 MiB
    assert (
        status_of(lambda: api.ListGoroutines(q.ListGoroutinesRequest(site=huge)))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    big = SimAgent("big")
    fat = snapshot(1, [site(f"main.f{i}", "/x.go:1" + "0" * 200) for i in range(40_000)])
    assert (
        status_of(
            lambda: stream(channel, [big.batch(appeared=[process_info(1, "fat")], snapshots=[fat])])
        )
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # the server is unharmed
    assert api.ListAgents(q.ListAgentsRequest()).agents


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Sends one bearer token with every call of a channel."""

    def __init__(self, token: str) -> None:
        self.md = (("authorization", f"Bearer {token}"),)

    def _add(self, details):  # type: ignore[no-untyped-def]
        return details._replace(metadata=tuple(details.metadata or ()) + self.md)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._add(details), requests)


def test_mutating_rpcs_need_the_admin_role(tmp_path: Path) -> None:
    for role, token in (("admin", ADMIN), ("viewer", VIEWER), ("agent", AGENT)):
        (tmp_path / role).write_text(token + "\n")
    cp = ControlPlaneProcess(
        tmp_path / "goleash.db",
        *("--admin-token-file", str(tmp_path / "admin")),
        *("--viewer-token-file", str(tmp_path / "viewer")),
        *("--agent-token-file", str(tmp_path / "agent")),
    )
    try:
        with grpc.insecure_channel(cp.address) as plain:
            _mutating_rpcs_need_the_admin_role(plain)
    finally:
        cp.stop()


def _mutating_rpcs_need_the_admin_role(plain: grpc.Channel) -> None:
    feed_shop(grpc.intercept_channel(plain, Bearer(AGENT)))
    api = q_grpc.GoleashServiceStub(plain)
    good = (("authorization", f"Bearer {ADMIN}"),)
    bad = (("authorization", "Bearer wrong"),)
    viewer = (("authorization", f"Bearer {VIEWER}"),)
    set_policy = q.SetPolicyRequest(policy_yaml=POLICY)
    degrade = q.OverrideServiceRequest(service="shop", action=q.OVERRIDE_ACTION_FORCE_DEGRADE)
    for md, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (bad, grpc.StatusCode.UNAUTHENTICATED),
        (viewer, grpc.StatusCode.PERMISSION_DENIED),
    ):
        assert status_of(lambda md=md: api.SetPolicy(set_policy, metadata=md)) == code
        assert status_of(lambda md=md: api.OverrideService(degrade, metadata=md)) == code
    assert api.GetPolicy(q.GetPolicyRequest(), metadata=viewer).version == 0  # viewers read
    assert api.SetPolicy(set_policy, metadata=good).version == 1

    broken = q.SetPolicyRequest(policy_yaml=POLICY + "  - name: goroutines\n    signal: x\n")
    with pytest.raises(grpc.RpcError) as info:
        api.SetPolicy(broken, metadata=good)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 5" in info.value.details() and "used twice" in info.value.details()
    assert ("goleash-policy-line", "5") in info.value.trailing_metadata()
    running = api.GetPolicy(q.GetPolicyRequest(), metadata=good)
    assert running.version == 1 and running.policy_yaml == POLICY
    assert running.mode == q.POLICY_MODE_MONITOR

    o = api.OverrideService(degrade, metadata=good).override
    assert o.service == "shop" and o.action == q.OVERRIDE_ACTION_FORCE_DEGRADE
    pause_unknown = q.OverrideServiceRequest(
        service="shop", action=q.OVERRIDE_ACTION_PAUSE_RULE, rule="nope"
    )
    assert status_of(lambda: api.OverrideService(pause_unknown, metadata=good)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert [x.action for x in api.GetPolicy(q.GetPolicyRequest(), metadata=good).overrides] == [
        q.OVERRIDE_ACTION_FORCE_DEGRADE
    ]
    events = api.ListEvents(q.ListEventsRequest(page_size=1000), metadata=viewer).events
    kinds = [e.kind for e in events]
    assert {t.EVENT_KIND_POLICY_SET, t.EVENT_KIND_POLICY_REJECTED, t.EVENT_KIND_OVERRIDE} <= set(
        kinds
    )
    assert not api.ListDecisions(q.ListDecisionsRequest(), metadata=viewer).decisions
    # the audit trail: every change names who made it
    audit = [e for e in events if e.kind in (t.EVENT_KIND_POLICY_SET, t.EVENT_KIND_OVERRIDE)]
    assert audit and all(e.details["identity"] == "admin-token" for e in audit)


def test_restart_mid_run_keeps_every_event(tmp_path: Path) -> None:
    db = tmp_path / "state"
    db.mkdir()
    cp = ControlPlaneProcess(db)
    port = cp.port
    agent = SimAgent("agent-a")
    info = process_info(1001, "shop")
    try:
        with grpc.insecure_channel(cp.address) as ch:
            stream(ch, [agent.batch(appeared=[info]), agent.batch(snapshots=[snapshot(1001)])])
            before = q_grpc.GoleashServiceStub(ch).ListEvents(q.ListEventsRequest()).events
            # an agent mid-stream when the control plane dies hard
            blocker = threading.Event()

            def batches() -> Iterator[ing.StreamBatchesRequest]:
                yield ing.StreamBatchesRequest(batch=agent.batch())
                blocker.wait(20)

            stub = ing_grpc.IngestServiceStub(ch)
            fut = stub.StreamBatches.future(batches())
            wait_for(
                lambda: (
                    q_grpc.GoleashServiceStub(ch)
                    .ListAgents(q.ListAgentsRequest())
                    .agents[0]
                    .last_sequence
                    == 3
                ),
                "the third batch",
            )
            assert cp.stop(signal.SIGKILL) == -signal.SIGKILL
            assert fut.exception(timeout=20).code() == grpc.StatusCode.UNAVAILABLE
            blocker.set()
    finally:
        cp.stop()
    assert [e.kind for e in before] == [
        t.EVENT_KIND_AGENT_CONNECTED,
        t.EVENT_KIND_PROCESS_APPEARED,
        t.EVENT_KIND_AGENT_DISCONNECTED,
    ]

    cp2 = ControlPlaneProcess(db, listen=f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(cp2.address) as ch:
            api = q_grpc.GoleashServiceStub(ch)
            # the agent reconnects and re-announces what it follows (first batch of a stream)
            stream(ch, [agent.batch(appeared=[info]), agent.batch(snapshots=[snapshot(1001)])])
            after = api.ListEvents(q.ListEventsRequest(page_size=1000)).events
            assert [(e.id, e.message) for e in after[: len(before)]] == [
                (e.id, e.message) for e in before
            ]
            new = [e.kind for e in after[len(before) :]]
            # the connection of the killed stream, then the new one: no second "appeared"
            assert t.EVENT_KIND_PROCESS_APPEARED not in new
            assert new.count(t.EVENT_KIND_AGENT_CONNECTED) == 2
            assert [e.id for e in after] == sorted({e.id for e in after})
            procs = api.ListProcesses(q.ListProcessesRequest()).processes
            assert [p.info.pid for p in procs] == [1001]
    finally:
        assert cp2.stop() == 0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mtls_only_lets_clients_with_a_signed_certificate_in(tmp_path: Path) -> None:
    d = tmp_path
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=goleash test CA",
        cwd=d,
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=goleash {name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    cp = ControlPlaneProcess(
        d / "goleash.db",
        *("--tls-cert", str(d / "server.crt"), "--tls-key", str(d / "server.key")),
        *("--tls-ca", str(d / "ca.crt")),
    )
    try:
        assert "(mTLS" in "".join(cp.stderr)
        ca = (d / "ca.crt").read_bytes()
        mtls = grpc.ssl_channel_credentials(
            ca, (d / "client.key").read_bytes(), (d / "client.crt").read_bytes()
        )
        with grpc.secure_channel(cp.address, mtls) as ch:
            stream(ch, [SimAgent("tls-agent").batch(appeared=[process_info(7, "secure")])])
        no_cert = grpc.ssl_channel_credentials(ca)
        for ch in (grpc.secure_channel(cp.address, no_cert), grpc.insecure_channel(cp.address)):
            with ch:
                stub = q_grpc.GoleashServiceStub(ch)
                assert status_of(
                    lambda stub=stub: stub.ListAgents(q.ListAgentsRequest(), timeout=5)
                ) == (grpc.StatusCode.UNAVAILABLE)
        tls = (
            "--tls-ca",
            str(d / "ca.crt"),
            "--tls-cert",
            str(d / "client.crt"),
            "--tls-key",
            str(d / "client.key"),
        )
        ps = json.loads(cli("ps", "--json", "--server", cp.address, *tls).stdout)
        assert [(p["service"], p["pid"]) for p in ps] == [("secure", 7)]
        r = cli("ps", "--server", cp.address, "--tls-ca", str(d / "ca.crt"), check=False)
        assert r.returncode == 2 and "cannot reach the control plane" in r.stderr
    finally:
        cp.stop()


def test_bad_configuration_fails_with_a_message(tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "a.db")
    try:
        r = cli(
            "control-plane", "--listen", cp.address, "--db", str(tmp_path / "b.db"), check=False
        )
        assert r.returncode == 2 and "cannot listen on" in r.stderr, r.stderr
    finally:
        cp.stop()
    r = cli(
        "control-plane",
        "--tls-cert",
        "/nonexistent.crt",
        "--db",
        str(tmp_path / "c.db"),
        check=False,
    )
    assert r.returncode == 2 and "--tls-key" in r.stderr
    assert "Traceback" not in r.stderr


def test_plaintext_health_port_and_prometheus_metrics(tmp_path: Path) -> None:
    cp = ControlPlaneProcess(
        tmp_path / "goleash.db",
        *("--health-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
    )
    try:
        line = next(x for x in cp.stderr if "listening on" in x)
        health_addr = line.split("health on ", 1)[1].split(",")[0].strip(" )\n")
        metrics_addr = line.split("metrics on ", 1)[1].split(",")[0].strip(" )\n")
        with grpc.insecure_channel(health_addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "goleash.ready"):
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            # the health port carries nothing else
            api = q_grpc.GoleashServiceStub(ch)
            assert status_of(lambda: api.ListAgents(q.ListAgentsRequest(), timeout=5)) == (
                grpc.StatusCode.UNIMPLEMENTED
            )
        with grpc.insecure_channel(cp.address) as ch:
            feed_shop(ch)
        from urllib.request import urlopen

        from prometheus_client.parser import text_string_to_metric_families

        text = urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        assert samples[("goleash_control_agents", (("state", "disconnected"),))] == 2
        assert samples[("goleash_control_processes", (("state", "running"),))] == 3
        assert samples[("goleash_control_processes", (("state", "gone"),))] == 1
        assert samples[("goleash_control_service_goroutines", (("service", "shop"),))] == 82
        assert samples[("goleash_control_service_orphans", (("service", "shop"),))] == 35
        assert samples[("goleash_control_batches_total", ())] == 6
        assert samples[("goleash_control_batch_gaps_total", ())] == 1
        assert samples[("goleash_control_events_total", ())] >= 9
        assert samples[("process_resident_memory_bytes", ())] > 0
    finally:
        cp.stop()
