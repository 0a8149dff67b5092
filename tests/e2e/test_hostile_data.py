"""Hostile data against a real `goleash control-plane` process over real sockets.

An agent (or anyone who can reach the ingest port) is not trusted, and neither is a
policy or override text: every case here sends what an attacker or a broken client
would, and asserts the gRPC status and that the state, the running policy, the
overrides and the event log did not change (a rejected policy leaves only its
POLICY_REJECTED event). Listening on loopback without credentials, as `goleash run`
does; authentication is tested on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentsim import SimAgent, goroutine, process_info, site, snapshot, stream
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.engine import DEFAULT_ACTION_WORKERS
from goleash.control.limits import DEFAULT_LIMITS
from polling import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_control_plane import ControlPlaneProcess  # noqa: E402

BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]
SHOP = ("main.handler.func1", "/src/shop/main.go:42")
BASE_POLICY = """\
mode: monitor
evaluation_interval: 200ms
rules:
  - name: g
    services: [shop]
    signal: {kind: goroutines, above: 100000}
"""
EVIL = "main.evil\x1b[2J\x1b]0;pwned\x07\x00\n\u2028"  # terminal escapes, NUL, newlines


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Plane:
    """A control plane with an honest agent, a policy and an override."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cp = ControlPlaneProcess(tmp / "goleash.db")
        self.ch = grpc.insecure_channel(self.cp.address)
        grpc.channel_ready_future(self.ch).result(timeout=10)
        self.api = q_grpc.GoleashServiceStub(self.ch)
        self.good = SimAgent("good-agent", "node-1")
        kept = [goroutine(10 + i, *SHOP, age=60 + i, orphan=True) for i in range(3)]
        resp = stream(
            self.ch,
            [
                self.good.batch(appeared=[process_info(1001, "shop")]),
                self.good.batch(
                    snapshots=[
                        snapshot(
                            1001,
                            [site(*SHOP, live=40, created=40, oldest=60, orphans=3)],
                            kept=kept,
                            latency={"main.callBackend": [1_000_000] * 50},
                        )
                    ]
                ),
            ],
        )
        assert resp.accepted == 2
        self.api.SetPolicy(q.SetPolicyRequest(policy_yaml=BASE_POLICY))
        self.api.OverrideService(
            q.OverrideServiceRequest(
                service="shop",
                action=q.OVERRIDE_ACTION_PAUSE_RULE,
                rule="g",
                duration_seconds=3600,
                reason="maintenance",
            )
        )
        # the engine's first round after the policy notes the pause: before any test looks
        wait_for(
            lambda: any("paused by an override" in e.message for e in self.events_after(0)),
            "the engine's first evaluation",
        )

    def world(self) -> dict[str, Any]:
        """What a user can see: agents, processes, sites, policy, overrides, last event."""
        api = self.api
        agents = api.ListAgents(q.ListAgentsRequest())
        procs = api.ListProcesses(q.ListProcessesRequest(include_gone=True))
        summary = api.GetGoroutineSummary(q.GetGoroutineSummaryRequest())
        pol = api.GetPolicy(q.GetPolicyRequest())
        return {
            "agents": sorted(
                (a.identity.agent_id, a.last_sequence, a.batches, a.processes, len(a.drops))
                for a in agents.agents
            ),
            "processes": sorted(
                (p.agent_id, p.info.pid, p.info.service, p.goroutines, p.orphans)
                for p in procs.processes
            ),
            "sites": sorted((s.service, s.function, s.go_statement, s.live) for s in summary.sites),
            "policy": (pol.version, pol.policy_yaml),
            "overrides": sorted(
                (o.id, o.service, o.action, o.expires_unix_nano) for o in pol.overrides
            ),
        }

    def last_event(self) -> int:
        page = self.api.ListEvents(q.ListEventsRequest(newest_first=True, page_size=1))
        return page.events[0].id if page.events else 0

    def events_after(self, after: int) -> list[t.Event]:
        return list(self.api.ListEvents(q.ListEventsRequest(after_id=after, page_size=1000)).events)

    def close(self) -> None:
        self.ch.close()
        self.cp.stop()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    p = Plane(tmp_path_factory.mktemp("hostile"))
    yield p
    p.close()


def rejected(
    plane: Plane,
    call: Callable[[], Any],
    code: grpc.StatusCode,
    allowed_events: frozenset[int] = frozenset(),
) -> grpc.RpcError:
    """Run a hostile call: it fails with `code`, and nothing a user sees changed."""
    before, last = plane.world(), plane.last_event()
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert plane.world() == before
    new = plane.events_after(last)
    assert all(e.kind in allowed_events for e in new), [e.message[:200] for e in new]
    assert plane.cp.proc.poll() is None, "the control plane died"
    return info.value


def send(plane: Plane, *batches: ing.AgentBatch) -> Callable[[], Any]:
    return lambda: stream(plane.ch, list(batches), timeout=60)


# --- ingest ----------------------------------------------------------------------------


def hostile_batches() -> dict[str, tuple[ing.AgentBatch, grpc.StatusCode]]:
    inv, exh = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    out: dict[str, tuple[ing.AgentBatch, grpc.StatusCode]] = {}

    def new(name: str) -> SimAgent:
        return SimAgent(f"hostile-{name}")

    a = new("nan-age")
    s = site(*SHOP, live=1, oldest=1.0)
    s.age.max_seconds = float("nan")
    out["nan site age"] = (
        a.batch(appeared=[process_info(7, "x")], snapshots=[snapshot(7, [s])]),
        inv,
    )
    a = new("inf-blocked")
    g = goroutine(1, *SHOP, age=float("inf"))
    out["inf goroutine age"] = (
        a.batch(
            appeared=[process_info(7, "x")],
            snapshots=[snapshot(7, [site(*SHOP, live=1)], kept=[g])],
        ),
        inv,
    )
    a = new("neg-orphan")
    s = site(*SHOP, live=1, orphans=1, orphan_oldest=-5.0)
    out["negative orphan age"] = (
        a.batch(appeared=[process_info(7, "x")], snapshots=[snapshot(7, [s])]),
        inv,
    )
    a = new("nan-interval")
    b = a.batch()
    b.heartbeat.interval_seconds = float("nan")
    out["nan heartbeat interval"] = (b, inv)
    a = new("huge-bucket")
    snap = snapshot(7, [site(*SHOP, live=1)])
    lat = snap.latency.add(function="main.f")
    lat.histogram.sub_bucket_bits = 3
    lat.histogram.count = 1
    lat.histogram.buckets.add(index=2**32 - 1, count=1)  # ~2^(2^29) ns: OverflowError before
    out["histogram bucket beyond 2^64 ns"] = (
        a.batch(appeared=[process_info(7, "x")], snapshots=[snap]),
        inv,
    )
    a = new("bits")
    snap = snapshot(7, [site(*SHOP, live=1)])
    snap.latency.add(function="main.f").histogram.sub_bucket_bits = 200
    out["histogram sub-bucket bits"] = (
        a.batch(appeared=[process_info(7, "x")], snapshots=[snap]),
        inv,
    )
    a = new("nan-sum")
    snap = snapshot(7, [site(*SHOP, live=1)], latency={"main.f": [1000]})
    snap.latency[0].histogram.sum_seconds = float("nan")
    out["nan histogram sum"] = (a.batch(appeared=[process_info(7, "x")], snapshots=[snap]), inv)
    out["4 MB agent id"] = (SimAgent("a" * (4 << 20), node="n").batch(), inv)
    out["control characters in the agent id"] = (SimAgent("agent\x1b[2J").batch(), inv)
    a = new("svc")
    out["service outside Kubernetes' naming rules"] = (
        a.batch(appeared=[process_info(7, "Shop/../../etc")]),
        inv,
    )
    a = new("long-svc")
    out["namespace/workload of 300 characters"] = (
        a.batch(appeared=[process_info(7, "shop/" + "s" * 300)]),
        inv,
    )
    a = new("mode")
    out["unknown tracking mode"] = (a.batch(appeared=[process_info(7, "x", mode=99)]), inv)
    a = new("procs")
    out["processes over the cap"] = (
        a.batch(
            appeared=[
                process_info(p, "x") for p in range(1, DEFAULT_LIMITS.processes_per_agent + 2)
            ]
        ),
        exh,
    )
    a = new("fns")
    out["traced functions over the cap"] = (
        a.batch(
            appeared=[process_info(7, "x")],
            snapshots=[
                snapshot(
                    7,
                    latency={
                        f"main.f{i}": [1000]
                        for i in range(DEFAULT_LIMITS.functions_per_process + 1)
                    },
                )
            ],
        ),
        exh,
    )
    a = new("drops")
    out["drop reasons over the cap"] = (
        a.batch(drops={f"r{i}": 1 for i in range(DEFAULT_LIMITS.drop_reasons + 1)}),
        exh,
    )
    a = new("waits")
    out["wait reasons over the cap"] = (
        a.batch(
            appeared=[process_info(7, "x")],
            snapshots=[snapshot(7, [site(*SHOP, live=1, waits={f"w{i}": 1 for i in range(100)})])],
        ),
        exh,
    )
    return out


HOSTILE = hostile_batches()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_batch_is_refused_and_changes_nothing(plane: Plane, case: str) -> None:
    batch, code = HOSTILE[case]
    rejected(plane, send(plane, batch), code)


def test_a_hostile_batch_after_good_ones_is_refused_and_the_good_ones_stay(plane: Plane) -> None:
    """Validation comes before any change: the bad batch on a stream is not half-applied."""
    a = SimAgent("half")
    bad = a.batch(
        appeared=[process_info(9, "half")], snapshots=[snapshot(9, [site(*SHOP, live=1)])]
    )
    bad.snapshots[0].sites[0].age.max_seconds = float("inf")
    with pytest.raises(grpc.RpcError) as info:
        stream(plane.ch, [a.batch(appeared=[process_info(8, "half")]), bad])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    procs = plane.api.ListProcesses(
        q.ListProcessesRequest(selector=q.ProcessSelector(agent_id="half"))
    )
    assert [p.info.pid for p in procs.processes] == [8]  # pid 9 of the bad batch is absent


def test_300k_sites_in_one_batch_are_refused_cheaply(plane: Plane) -> None:
    """The 6.7 MB batch that took the control plane from 320 MB to 1 GB."""
    a = SimAgent("flood")
    snap = ing.ProcessSnapshot(pid=7, goroutines=300_000)
    for i in range(300_000):
        snap.sites.add(function=f"f{i}", go_statement=f"a:{i}", live=1)
    batch = a.batch(appeared=[process_info(7, "flood")], snapshots=[snap])
    assert batch.ByteSize() > 6_000_000
    rss_before = rss_kb(plane.cp.proc.pid)
    for _ in range(5):  # each refused batch used to stay in memory (45 MB) until a full GC
        err = rejected(plane, send(plane, batch), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "sites" in (err.details() or "")
    # a generous ceiling: parsing the message is all it costs (no windows per site)
    assert rss_kb(plane.cp.proc.pid) - rss_before < 120 * 1024


def test_a_sequence_of_2_64_cannot_jam_an_agent(plane: Plane) -> None:
    """ListAgents shows ids: a batch with a known id and sequence 2^64-1 would make
    every later batch of that agent a duplicate."""
    jam = SimAgent("good-agent")
    jam.identity.CopyFrom(plane.good.identity)
    rejected(plane, send(plane, jam.batch(sequence=2**64 - 1)), grpc.StatusCode.INVALID_ARGUMENT)
    jump = jam.batch(sequence=plane.good.sequence + DEFAULT_LIMITS.sequence_jump + 1)
    rejected(plane, send(plane, jump), grpc.StatusCode.INVALID_ARGUMENT)
    resp = stream(plane.ch, [plane.good.batch()])
    assert resp.accepted == 1 and resp.duplicates == 0


def test_names_too_long_are_cut_and_counted_not_stored_whole(plane: Plane) -> None:
    """An executable's name or a symbol is whatever the host had: cut, so the batch's
    other processes are not lost with it."""
    a = SimAgent("long-names")
    resp = stream(
        plane.ch,
        [
            a.batch(
                appeared=[process_info(7, "x" * 300), process_info(8, "ok")],
                snapshots=[snapshot(7, [site("f" * 100_000, "a.go:1", live=1)])],
            )
        ],
    )
    assert resp.accepted == 1
    procs = plane.api.ListProcesses(
        q.ListProcessesRequest(selector=q.ProcessSelector(agent_id="long-names"))
    ).processes
    assert sorted(len(p.info.service) for p in procs) == [2, 253]
    sites = plane.api.GetGoroutineSummary(
        q.GetGoroutineSummaryRequest(selector=q.ProcessSelector(service="x" * 253))
    ).sites
    assert [len(s.function) for s in sites] == [1024]
    (agent,) = [
        x
        for x in plane.api.ListAgents(q.ListAgentsRequest()).agents
        if x.identity.agent_id == "long-names"
    ]
    assert {d.reason: d.count for d in agent.drops} == {"strings_over_length": 2}


def test_deep_stacks_and_too_many_kept_goroutines_are_truncated_and_counted(plane: Plane) -> None:
    a = SimAgent("deep")
    g = goroutine(1, *SHOP, age=10)
    for i in range(3000):
        g.stack.add(function=f"main.rec{i}", file="/a.go", line=i + 1)
    kept = [g] + [
        goroutine(2 + i, *SHOP, age=5) for i in range(DEFAULT_LIMITS.kept_goroutines + 49)
    ]
    resp = stream(
        plane.ch,
        [
            a.batch(
                appeared=[process_info(5, "deep")],
                snapshots=[snapshot(5, [site(*SHOP, live=2000)], kept=kept)],
            )
        ],
    )
    assert resp.accepted == 1
    gs = plane.api.ListGoroutines(
        q.ListGoroutinesRequest(selector=q.ProcessSelector(service="deep"), page_size=1000)
    )
    assert gs.total_size == DEFAULT_LIMITS.kept_goroutines
    assert max(len(r.goroutine.stack) for r in gs.goroutines) == DEFAULT_LIMITS.stack_depth
    (p,) = plane.api.ListProcesses(
        q.ListProcessesRequest(selector=q.ProcessSelector(service="deep"))
    ).processes
    drops = {d.reason: d.count for d in p.drops}
    assert drops == {"kept_goroutines_over_cap": 50, "stack_frames_over_cap": 1}


# --- policies and overrides ------------------------------------------------------------


BAD_POLICIES = {
    "evaluation_interval .inf": (BASE_POLICY.replace("200ms", ".inf"), 2),
    "evaluation_interval .nan": (BASE_POLICY.replace("200ms", ".nan"), 2),
    "threshold .inf": (BASE_POLICY.replace("100000", ".inf"), 6),
    "threshold .nan": (BASE_POLICY.replace("100000", ".nan"), 6),
    "hold .inf": (BASE_POLICY + "    recovery: {hold: .inf}\n", 7),
    "cooldown initial .nan": (BASE_POLICY + "    cooldown: {initial: .nan}\n", 7),
    "cooldown backoff .inf": (BASE_POLICY + "    cooldown: {backoff: .inf}\n", 7),
    "exec timeout .nan": (
        BASE_POLICY
        + "    levels: [{level: L1, actions: [{type: exec, command: [id],\n"
        + "      timeout_seconds: .nan}]}]\n",
        8,
    ),
    "webhook timeout .inf": (
        BASE_POLICY
        + "    levels:\n      - level: L1\n        actions:\n"
        + "          - {type: webhook, url: 'http://127.0.0.1:1/', timeout_seconds: .inf}\n",
        10,
    ),
    "retry delay .nan": (
        BASE_POLICY
        + "    levels: [{level: L1, actions: [{type: event, retry_max_seconds: .nan}]}]\n",
        7,
    ),
    "quantile .nan": (
        BASE_POLICY.replace(
            "signal: {kind: goroutines, above: 100000}",
            "signal: {kind: function_latency, function: main.f, quantile: .nan, above: 1s}",
        ),
        6,
    ),
    "window of a year": (
        BASE_POLICY.replace("above: 100000}", "above: 100000}\n    sustain: {window: 8760h}"),
        7,
    ),
    "duplicate key": ("mode: monitor\nmode: enforce\nrules: []\n", 2),
    "duplicate key in a rule": (
        BASE_POLICY.replace(
            "    services: [shop]\n", "    services: [shop]\n    services: ['*']\n"
        ),
        6,
    ),
    "file path with ..": (
        BASE_POLICY + "    levels: [{level: L1, actions: [{type: file, path: /tmp/../etc/x}]}]\n",
        7,
    ),
    "file path with NUL": (
        BASE_POLICY + '    levels: [{level: L1, actions: [{type: file, path: "/tmp/x\\0y"}]}]\n',
        7,
    ),
    "kubernetes action without namespaces": (
        BASE_POLICY + "    levels: [{level: L1, actions: [{type: kubernetes}]}]\n",
        7,
    ),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_a_bad_policy_is_rejected_with_its_line_and_the_running_one_stays(
    plane: Plane, case: str
) -> None:
    text, line = BAD_POLICIES[case]
    err = rejected(
        plane,
        lambda: plane.api.SetPolicy(q.SetPolicyRequest(policy_yaml=text)),
        grpc.StatusCode.INVALID_ARGUMENT,
        frozenset({t.EVENT_KIND_POLICY_REJECTED}),
    )
    trailer = dict(err.trailing_metadata() or ())
    assert trailer.get("goleash-policy-line") == str(line), err.details()


@pytest.mark.parametrize(
    "duration", [float("nan"), float("inf"), float("-inf"), -1.0, 1e300], ids=str
)
@pytest.mark.parametrize(
    "action",
    [q.OVERRIDE_ACTION_FORCE_DEGRADE, q.OVERRIDE_ACTION_PAUSE_RULE],
    ids=["degrade", "pause"],
)
def test_a_bad_override_changes_no_override(plane: Plane, duration: float, action: int) -> None:
    """`inf` used to clear the existing overrides and then fail with UNKNOWN."""
    req = q.OverrideServiceRequest(
        service="shop", action=action, rule="g", level="L1", duration_seconds=duration
    )
    rejected(plane, lambda: plane.api.OverrideService(req), grpc.StatusCode.INVALID_ARGUMENT)


# --- what reaches terminals and reports -------------------------------------------------


def test_control_characters_in_names_stay_out_of_terminals_and_keep_the_svg_valid(
    tmp_path: Path,
) -> None:
    p = Plane(tmp_path)
    try:
        # a decision on the evil service draws a flame graph of its names: valid XML
        p.api.SetPolicy(
            q.SetPolicyRequest(
                policy_yaml="mode: monitor\nevaluation_interval: 200ms\nrules:\n"
                "  - name: many\n    services: ['evil*']\n"
                "    signal: {kind: goroutines, above: 100}\n"
            )
        )
        a = SimAgent("evil-agent")
        g = goroutine(1, EVIL, "/src/\x1b[31m.go:1", age=100, orphan=True)
        for i in range(3000):  # and a stack deeper than Python's recursion limit
            g.stack.add(function=f"{EVIL}{i}", file="/a.go", line=i + 1)
        info = process_info(77, "", exe="/usr/bin/evil\x1b[31mname")
        resp = stream(
            p.ch,
            [
                a.batch(appeared=[info]),
                a.batch(
                    snapshots=[
                        snapshot(
                            77,
                            [
                                site(
                                    EVIL,
                                    "/src/\x1b[31m.go:1",
                                    live=500,
                                    orphans=1,
                                    orphan_oldest=100,
                                )
                            ],
                            kept=[g],
                        )
                    ]
                ),
            ],
        )
        assert resp.accepted == 2
        reports = tmp_path / "reports"
        svg = wait_for(
            lambda: sorted(reports.glob("*.svg")) if reports.exists() else None, "a flame graph"
        )[0]
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg")
        assert "main.evil" in svg.read_text()
        svc = p.api.GetGoroutineSummary(q.GetGoroutineSummaryRequest()).sites
        evil_service = next(s.service for s in svc if s.function == EVIL)
        assert "\x1b" not in evil_service  # derived from the executable's name: made printable
        for args in (
            ["ps"],
            ["orphans"],
            ["dump", "--service", evil_service],
            ["events"],
            ["agents"],
        ):
            r = subprocess.run(
                [*GOLEASH, *args, "--server", p.cp.address],
                capture_output=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert (
                b"\x1b" not in r.stdout and b"\x00" not in r.stdout and b"\x07" not in r.stdout
            ), args
    finally:
        p.close()


# --- the engine and its workers --------------------------------------------------------


def test_300_services_use_a_bounded_pool_and_file_paths_stay_in_their_directory(
    tmp_path: Path,
) -> None:
    """One thread per service used to be created and never reaped (300 -> 308 threads);
    and a service named `..` must not move a flag file out of its directory."""
    cp = ControlPlaneProcess(tmp_path / "goleash.db")
    ch = grpc.insecure_channel(cp.address)
    try:
        api = q_grpc.GoleashServiceStub(ch)
        flags = tmp_path / "flags"
        flags.mkdir()
        idle_threads = threads(cp.proc.pid)
        api.SetPolicy(
            q.SetPolicyRequest(
                policy_yaml=(
                    "mode: enforce\nevaluation_interval: 200ms\nrules:\n  - name: many\n"
                    "    signal: {kind: goroutines, above: 100}\n"
                    "    levels: [{level: L1, actions: [{type: file, path: "
                    f"'{flags}/{{service}}/flag'}}]}}]\n"
                    "blast_radius: {max_services: 1000, max_percent: 100}\n"
                )
            )
        )
        a = SimAgent("fleet")
        infos = [process_info(1000 + i, f"svc-{i:03d}") for i in range(300)]
        infos.append(process_info(999, "", exe="/opt/.."))  # its service is ".."
        for i in range(300):
            (flags / f"svc-{i:03d}").mkdir()
        snaps = [snapshot(i.pid, goroutines=500) for i in infos]
        assert stream(ch, [a.batch(appeared=infos), a.batch(snapshots=snaps)]).accepted == 2
        wait_for(lambda: len(list(flags.glob("*/flag"))) == 300, "300 flag files", timeout=90)
        assert threads(cp.proc.pid) <= idle_threads + DEFAULT_ACTION_WORKERS + 2
        assert not (tmp_path / "flag").exists()  # flags/../flag

        def refused() -> list[t.Event]:
            evs = api.ListEvents(
                q.ListEventsRequest(filter=q.EventFilter(kinds=[t.EVENT_KIND_ACTION], service=".."))
            ).events
            return [e for e in evs if "cannot be part of a file name" in e.message]

        assert wait_for(refused, "the refused action's event")
    finally:
        ch.close()
        assert cp.stop() == 0


def test_event_and_agent_listings_fit_the_clients_limit_after_an_attack(plane: Plane) -> None:
    """Two streams with 3 MB agent ids used to grow the log until `goleash events`
    and `goleash agents` failed (response over 4 MB)."""
    for name in ("x", "y"):
        rejected(
            plane,
            send(plane, SimAgent(name * (3 << 20), node="n").batch()),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    for args in (["events", "--limit", "1000"], ["agents"]):
        r = subprocess.run(
            [*GOLEASH, *args, "--server", plane.cp.address], capture_output=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
