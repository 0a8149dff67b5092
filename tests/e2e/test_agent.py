"""`goleash agent` and `goleash run` as real processes: real Go fixtures, real uprobes,
a real control plane on a real port, queried through the CLI and gRPC.

These tests check the data path (discovery, batches, reconnects, endpoints, clean
detach), not the probes' correctness per Go release: tests/bpf covers every toolchain
and variant. So they use two toolchains (1.22 and 1.25: before and after the 1.23
newproc1 signature change) and an interval of 1 s to stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import gobuild
import goleash
from daemons import GOLEASH, Daemon, agent_args, node_args, stop_both
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.gobin.disasm import goroutine_probe_sites
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import FLAGS, READY_TIMEOUT, Populations, read_json_line
from probe_evidence import uprobe_fds

pytestmark = pytest.mark.root

GO_A, GO_B = "1.22.10", "1.25.5"
INTERVAL = 1.0
SCAN = 1.0  # the agent's /proc scan period
# Within one interval: a process is announced at the scan after it starts, with its
# first snapshot; attaching (BPF compile + inventory) takes about a second here, but a
# BCC compile (--func) on a busy host takes ten: the deadline is for failures only.
APPEAR_S = INTERVAL + SCAN + 20.0
COUNTS = {"orphan": 30, "nilselect": 7, "condwait": 5, "worker": 3, "sleeper": 4}
WAITS = {"orphan": "chan receive", "nilselect": "select", "condwait": "sync.Cond.Wait"}
WAITS |= {"sleeper": "sleep"}
FUNCS = {k: f"main.{k}" for k in COUNTS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stmt(marker: str) -> str:
    fname, line = gobuild.marker_line("populations", marker)
    return f"{fname}:{line}"


# --- processes under test ------------------------------------------------------------------


class ControlPlane(Daemon):
    def __init__(self, db: Path, port: int = 0) -> None:
        super().__init__(["control-plane", "--listen", f"127.0.0.1:{port}", "--db", str(db)])
        self.address = self.wait_line(r"listening on (\S+)").group(1)


class Agent(Daemon):
    def __init__(self, server: str, *selection: str, extra: tuple[str, ...] = ()) -> None:
        super().__init__(agent_args(server, INTERVAL, *selection, *extra))
        m = self.wait_line(r"health on (\S+); metrics on http://(\S+)/metrics")
        self.health, self.metrics = m.group(1).rstrip(";"), m.group(2)

    def scrape(self) -> dict[str, list[Any]]:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 if absent)."""
        for fam in self.scrape().values():
            for s in fam:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def health_status(self, service: str) -> int:
        with grpc.insecure_channel(self.health) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


@contextmanager
def populations(
    tmp_path: Path, name: str, toolchain: str = GO_A, **counts: int
) -> Iterator[Populations]:
    """The populations fixture under a name of our own, so that `--exe` globs select
    this test's process and no other test's."""
    exe = tmp_path / name
    shutil.copy(gobuild.build("populations", toolchain), exe)
    args = [str(exe)]
    for k, n in (counts or COUNTS).items():
        args += [f"-{FLAGS[k]}", str(n)]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        ready = read_json_line(proc, READY_TIMEOUT)
        assert ready.get("ready") is True, ready
        yield Populations(proc, ready)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def cli_json(*args: str) -> Any:
    r = subprocess.run([*GOLEASH, *args, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cli_text(*args: str) -> str:
    r = subprocess.run([*GOLEASH, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check_one_dump_schema(server: str, pid: int) -> None:
    """`dump --json` read from the process and from the control plane: one schema
    (same keys, same types, lowercase states, integer goids), the same orphans."""
    local = cli_json("dump", "--pid", str(pid))
    remote = cli_json("dump", "--server", server, "--pid", str(pid))
    assert local["schema"] == remote["schema"] == "goleash.dump/v1"
    assert (local["source"], remote["source"]) == ("process", "control-plane")

    def orphans(doc: Any) -> dict[int, dict[str, Any]]:
        return {g["goid"]: g for g in doc["goroutines"] if g["start_function"] == "main.orphan"}

    mine, kept = orphans(local), orphans(remote)
    assert set(mine) == set(kept) and len(mine) == COUNTS["orphan"]
    for goid, g in kept.items():
        ours = mine[goid]
        assert list(g) == list(ours)  # the same keys in the same order
        for k, v in g.items():
            # a value one side cannot know is null; the types never differ
            assert v is None or ours[k] is None or type(v) is type(ours[k]), (k, v, ours[k])
        same = ("goid", "parent_goid", "state", "wait_reason", "start_function", "created_by")
        assert {k: g[k] for k in same} == {k: ours[k] for k in same}
        assert (g["state"], g["wait_reason"], g["pid"]) == ("waiting", "chan receive", pid)
        assert g["go_statement"].endswith(stmt("orphan"))
        assert "main.orphan" in [f["function"] for f in g["frames"]]


def api(address: str) -> q_grpc.GoleashServiceStub:
    return q_grpc.GoleashServiceStub(grpc.insecure_channel(address))


def sites_of(stub: q_grpc.GoleashServiceStub, pid: int) -> dict[str, q.SiteStats]:
    resp = stub.GetGoroutineSummary(
        q.GetGoroutineSummaryRequest(selector=q.ProcessSelector(pid=pid)), timeout=5
    )
    return {s.function: s for s in resp.sites}


def listed(address: str, pid: int) -> dict[str, Any] | None:
    return next((p for p in cli_json("ps", "--server", address) if p["pid"] == pid), None)


def check_populations(stub: q_grpc.GoleashServiceStub, pid: int, counts: dict[str, int]) -> None:
    sites = sites_of(stub, pid)
    for pop, n in counts.items():
        s = sites[FUNCS[pop]]
        assert s.live == n, (pop, s)
        assert s.go_statement.endswith("/" + stmt(pop)), (pop, s.go_statement)
        if pop in WAITS:
            assert s.wait_reasons[0].reason == WAITS[pop], (pop, s.wait_reasons)
    assert sites["main.orphan"].orphans == counts["orphan"]
    assert sites["main.orphan"].creator_function == "main.creator"
    assert all(s.orphans == 0 for f, s in sites.items() if f != "main.orphan")


# --- probes in the target --------------------------------------------------------------------


def probe_bytes(pid: int) -> tuple[list[int], list[int]]:
    """(bytes in the process, bytes in the file) at the goroutine probes' sites. The
    kernel writes int3 (0xcc) into the process's copy of a page to place a uprobe and
    restores the original byte when the last probe there goes."""
    with GoProcess.attach(pid) as proc:
        sites = goroutine_probe_sites(proc.binary, proc.symbols.lookup)
        where = [s for s in (sites.create, sites.exit, *sites.create_rets) if s is not None]
        live = [proc.memory.read(s.vaddr + proc.load_bias, 1)[0] for s in where]
        disk = [proc.binary.read(s.vaddr, 1)[0] for s in where]
    return live, disk


def probes_in(pid: int) -> int:
    """How many of the goroutine probe sites hold an int3: the creation probe by
    default, the exit probe too with --lifetimes."""
    live, disk = probe_bytes(pid)
    assert 0xCC not in disk
    return live.count(0xCC)


# --- tests --------------------------------------------------------------------------------------


def test_processes_appear_with_their_populations_and_vanish(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp.db")
    agent = Agent(cp.address, "--exe", "*goleash-e2e-appear*")
    stub = api(cp.address)
    try:
        wait_for(lambda: agent.health_status("goleash.ready") == 1, "the agent to be ready")
        with populations(tmp_path, "goleash-e2e-appear") as pop:
            started = time.monotonic()
            row = wait_for(lambda: listed(cp.address, pop.pid), "ps to list it", APPEAR_S)
            appeared_after = time.monotonic() - started
            assert row["service"] == "goleash-e2e-appear" and row["go_version"] == "go" + GO_A
            assert row["tracking"] == "probes" and row["state"] == "running"
            assert row["goroutines"] == sum(COUNTS.values()) + 2  # + main, owner
            check_populations(stub, pop.pid, COUNTS)
            orphans = cli_json("orphans", "--server", cp.address)
            (group,) = [g for g in orphans if g["service"] == "goleash-e2e-appear"]
            assert (group["function"], group["count"], group["reason"]) == (
                "main.orphan",
                COUNTS["orphan"],
                "chan receive",
            )
            assert group["go_statement"].endswith(stmt("orphan"))
            assert any("main.orphan" in f for f in group["example_stack"]), group
            kept = stub.ListGoroutines(
                q.ListGoroutinesRequest(selector=q.ProcessSelector(pid=pop.pid), orphans_only=True)
            )
            assert kept.total_size == COUNTS["orphan"]
            assert {g.goroutine.parent_goid for g in kept.goroutines} <= set(pop.creator_goids)

            # The same goroutines as a dump, from the control plane.
            text = cli_text("dump", "--server", cp.address, "--pid", str(pop.pid))
            orphan_blocks = [b for b in text.split("\n\n") if "main.orphan(...)" in b]
            assert len(orphan_blocks) == COUNTS["orphan"]
            assert all(
                "[chan receive" in b and "created by main.creator in goroutine" in b
                for b in orphan_blocks
            )
            check_one_dump_schema(cp.address, pop.pid)

            # Goroutines born and gone between two snapshots: counted by the probes.
            pop.churn(500)

            def churned() -> q.SiteStats | None:
                s = sites_of(stub, pop.pid).get("main.churn")
                return s if s is not None and (s.created, s.exited) == (500, 500) else None

            s = wait_for(churned, "500 churn goroutines created and exited", 3 * INTERVAL + 5)
            assert s.live == 0 and s.go_statement.endswith(stmt("churn"))

            pop.proc.stdin.write("exit\n")  # type: ignore[union-attr]
            pop.proc.stdin.flush()  # type: ignore[union-attr]
            pop.proc.wait(timeout=10)
            wait_for(lambda: listed(cp.address, pop.pid) is None, "ps to drop it", APPEAR_S)
        gone = [
            p
            for p in cli_json("ps", "--server", cp.address, "--all")
            if p["pid"] == pop.pid and p["state"] == "gone"
        ]
        assert len(gone) == 1 and gone[0]["created"] >= 500
        kinds = [
            e["kind"]
            for e in cli_json("events", "--server", cp.address, "--pid", str(pop.pid))
            if e["kind"] in ("process_appeared", "process_gone")
        ]
        assert kinds == ["process_appeared", "process_gone"]
        print(f"appeared in ps {appeared_after:.2f}s after the process was ready")
    finally:
        stop_both(agent, cp)
    assert "probes detached" in agent.log


def test_two_agents_feed_one_control_plane(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp.db")
    stub = api(cp.address)
    counts_b = {"orphan": 20, "nilselect": 2, "condwait": 1, "worker": 1, "sleeper": 9}
    with (
        populations(tmp_path, "goleash-e2e-two-a", GO_A) as a,
        populations(tmp_path, "goleash-e2e-two-b", GO_B, **counts_b) as b,
        subprocess.Popen(["sleep", "600"]) as not_go,
    ):
        agents = [
            Agent(cp.address, "--pid", str(a.pid), str(not_go.pid), extra=("--agent-id", "a")),
            Agent(cp.address, "--pid", str(b.pid), extra=("--agent-id", "b")),
        ]
        try:
            for pid in (a.pid, b.pid):
                wait_for(lambda pid=pid: listed(cp.address, pid), f"PID {pid} in ps", APPEAR_S)
            by_pid = {p["pid"]: p for p in cli_json("ps", "--server", cp.address)}
            assert (by_pid[a.pid]["agent_id"], by_pid[b.pid]["agent_id"]) == ("a", "b")
            assert by_pid[b.pid]["go_version"] == "go" + GO_B
            assert not_go.pid not in by_pid
            check_populations(stub, a.pid, COUNTS)
            check_populations(stub, b.pid, counts_b)
            listing = stub.ListAgents(q.ListAgentsRequest(), timeout=5).agents
            states = {x.identity.agent_id: x.state for x in listing}
            assert states == {"a": q.AGENT_STATE_CONNECTED, "b": q.AGENT_STATE_CONNECTED}
            # a selected process that is not Go: said once, and the agent carries on ready
            agents[0].wait_line(rf"--pid {not_go.pid}: .*not a Go", timeout=10)
            assert agents[0].health_status("goleash.ready") == 1
        finally:
            not_go.kill()
            for x in agents:
                assert x.stop() == 0, x.log
            cp.stop()


def test_control_plane_restart_buffer_reconnect_and_drops(tmp_path: Path) -> None:
    port, db, buffered = free_port(), tmp_path / "cp.db", 10
    cp = ControlPlane(db, port)
    with populations(tmp_path, "goleash-e2e-restart") as pop:
        agent = Agent(cp.address, "--pid", str(pop.pid), extra=("--buffer-batches", str(buffered)))
        try:

            def status() -> q.AgentStatus | None:
                try:
                    found = api(cp.address).ListAgents(q.ListAgentsRequest(), timeout=2).agents
                except grpc.RpcError:
                    return None
                return found[0] if found else None

            wait_for(lambda: (s := status()) and s.last_sequence >= 3, "three batches")

            # 1. Away for fewer intervals than the buffer holds (a restart and the
            # agent's backoff: a few seconds): nothing is lost.
            seen_before = status().last_sequence  # type: ignore[union-attr]
            cp.stop(signal.SIGKILL)
            made = agent.metric("goleash_agent_batches_total")
            wait_for(
                lambda: agent.metric("goleash_agent_batches_total") >= made + 2,
                "batches assembled while the control plane is away",
            )
            assert agent.metric("goleash_agent_connected") == 0
            cp = ControlPlane(db, port)
            now = agent.metric("goleash_agent_batches_total")
            s = wait_for(lambda: (x := status()) and x.last_sequence >= now and x, "catching up")
            # A new control plane starts counting at the first batch it gets: no gap, and
            # every batch after the last one the old one saw arrived.
            assert s.gaps == 0 and s.batches >= s.last_sequence - seen_before, s
            assert not {d.reason for d in s.drops}, s.drops
            assert agent.metric("goleash_agent_reconnects_total") >= 1
            wait_for(lambda: listed(cp.address, pop.pid), "the process known again")
            check_populations(api(cp.address), pop.pid, COUNTS)

            # 2. Away for longer than the buffer holds: the oldest are dropped, counted,
            # and the count reaches the control plane.
            cp.stop(signal.SIGKILL)

            def dropped() -> float:
                return agent.metric(
                    "goleash_agent_batches_dropped_total", reason="batches_buffer_full"
                )

            wait_for(
                lambda: dropped() >= 2, "batches dropped", timeout=(buffered + 6) * INTERVAL + 10
            )
            cp = ControlPlane(db, port)
            s = wait_for(
                lambda: (x := status()) and {d.reason: d.count for d in x.drops} and x,
                "the drop count at the control plane",
            )
            assert {d.reason: d.count for d in s.drops} == {"batches_buffer_full": dropped()}

            # The event log kept its events across both restarts, each once.
            events = cli_json("events", "--server", cp.address, "--pid", str(pop.pid))
            assert [e["kind"] for e in events].count("process_appeared") == 1
        finally:
            stop_both(agent, cp)


def test_agent_killed_leaves_no_probe_behind(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp.db")
    with populations(tmp_path, "goleash-e2e-kill") as pop:
        assert probes_in(pop.pid) == 0
        agent = Agent(cp.address, "--pid", str(pop.pid), extra=("--lifetimes",))
        try:
            wait_for(lambda: listed(cp.address, pop.pid), "the process in ps", APPEAR_S)
            # --lifetimes: the exit probe is placed too, and must go too
            wait_for(lambda: probes_in(pop.pid) >= 2, "the uprobes in the target")
            assert agent.health_status("goleash.ready") == 1
            # The uprobes are perf events or uprobe BPF links held by the agent's fds
            # (and so never listed in tracefs's uprobe_events, which proves nothing):
            # the kernel removes them when the killed process's files are closed.
            held = uprobe_fds(agent.proc.pid)
            assert held, "the agent holds no uprobe fd while its probes are in the target"
            agent.stop(signal.SIGKILL)
            # The proof: every probed byte of the target is the file's byte again.
            wait_for(
                lambda: (b := probe_bytes(pop.pid))[0] == b[1], "the int3 bytes to be restored", 10
            )
            # The target goes on as before: it still creates, runs and ends goroutines
            # and answers, and its populations are where they were.
            pop.churn(1000)
            stacks = pop.command("stacks")["stacks"]
            assert stacks.count("main.orphan()") == COUNTS["orphan"]
            assert pop.proc.poll() is None
        finally:
            try:
                agent.stop()
            finally:
                cp.stop()


def test_metrics_and_health(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp.db")
    with populations(tmp_path, "goleash-e2e-metrics") as pop:
        agent = Agent(cp.address, "--exe", "goleash-e2e-metrics")
        try:
            assert agent.health_status("") == health_pb2.HealthCheckResponse.SERVING
            wait_for(lambda: agent.health_status("goleash.ready") == 1, "ready")
            svc = "goleash-e2e-metrics"  # series are named by service, not pid
            wait_for(
                lambda: agent.metric(
                    "goleash_goroutines_live", service=svc, function="main.orphan"
                ),
                "per-site metrics",
                APPEAR_S,
            )
            pop.churn(200)
            wait_for(
                lambda: (
                    agent.metric(
                        "goleash_goroutines_exited_total", service=svc, function="main.churn"
                    )
                    == 200
                ),
                "the churn counted",
            )
            fams = agent.scrape()
            by_fn = {
                s.labels["function"]: s
                for s in fams["goleash_goroutines_live"]
                if s.labels["service"] == svc
            }
            for pop_name, n in COUNTS.items():
                assert by_fn[FUNCS[pop_name]].value == n
                assert by_fn[FUNCS[pop_name]].labels["service"] == "goleash-e2e-metrics"
                # module-relative, not the build machine's path
                where = by_fn[FUNCS[pop_name]].labels["go_statement"]
                assert where == f"example.com/populations/{stmt(pop_name)}", where
                assert "pid" not in by_fn[FUNCS[pop_name]].labels
            assert not any(f.startswith("runtime.") and f != "runtime.main" for f in by_fn)
            orphaned = {
                s.labels["function"]: s.value
                for s in fams["goleash_goroutines_orphaned"]
                if s.labels["service"] == svc and s.value
            }
            assert orphaned == {"main.orphan": COUNTS["orphan"]}
            created = {
                s.labels["function"]: s.value
                for s in fams["goleash_goroutines_created"]
                if s.name.endswith("_total") and s.labels["service"] == svc
            }
            assert created["main.churn"] == 200
            hits = {
                s.labels["probe"]: s.value
                for s in fams["goleash_probe_hits"]
                if s.labels["service"] == svc
            }
            # One trap per goroutine by default: exits follow from memory.
            assert hits["create"] >= 200 and hits.get("exit", 0) == 0
            samples = {s.name: s.value for fam in fams.values() for s in fam if not s.labels}
            assert samples["goleash_agent_tracked_processes"] == 1
            (info,) = fams["goleash_build_info"]
            assert info.value == 1 and info.labels["version"] == goleash.__version__
            assert samples["goleash_agent_connected"] == 1
            assert samples["goleash_agent_batches_total"] >= 1
            assert samples["process_cpu_seconds_total"] > 0
            assert samples["process_resident_memory_bytes"] > 0
        finally:
            stop_both(agent, cp)
        # SIGTERM: the agent detached everything on its way out
        assert probes_in(pop.pid) == 0


def test_goleash_run_shows_the_fixture_within_an_interval(tmp_path: Path) -> None:
    with populations(tmp_path, "goleash-e2e-run") as pop:
        run = Daemon(
            [
                "run",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(tmp_path / "run.db"),
                "--exe",
                "*goleash-e2e-run",
                *node_args(INTERVAL),
            ]
        )
        try:
            address = run.wait_line(r"control plane listening on (\S+)").group(1)
            row = wait_for(lambda: listed(address, pop.pid), "ps to list it", APPEAR_S)
            assert row["tracking"] == "probes" and row["orphans"] == COUNTS["orphan"]
            (group,) = cli_json("orphans", "--server", address)
            assert (group["function"], group["count"]) == ("main.orphan", COUNTS["orphan"])
            top = subprocess.run(
                [*GOLEASH, "top", "--once", "--server", address],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert top.returncode == 0 and "main.orphan" in top.stdout, top.stderr
            assert os.getpid() != pop.pid
        finally:
            assert run.stop() == 0, run.log
        assert probes_in(pop.pid) == 0


def test_agent_alone_survives_no_control_plane(tmp_path: Path) -> None:
    """Started before any control plane exists: it traces, buffers, and is ready
    (readiness is about its probes, not about the control plane)."""
    with populations(tmp_path, "goleash-e2e-alone") as pop:
        agent = Agent(f"127.0.0.1:{free_port()}", "--pid", str(pop.pid))
        try:
            wait_for(lambda: agent.health_status("goleash.ready") == 1, "ready")
            wait_for(lambda: probes_in(pop.pid) >= 1, "the probes placed")
            wait_for(lambda: agent.metric("goleash_agent_buffered_batches") >= 2, "buffering")
            assert agent.metric("goleash_agent_connected") == 0
        finally:
            assert agent.stop() == 0, agent.log
        assert probes_in(pop.pid) == 0


def test_function_latency_and_panics_reach_the_control_plane(tmp_path: Path) -> None:
    """--func and --panics: the funclat fixture's `panics` workload calls safeCall
    goroutines x calls times; every 4th call's mayPanic panics (recovered in safeCall),
    every 10th call also an index panic."""
    goroutines, calls = 4, 40
    exe = tmp_path / "goleash-e2e-funclat"
    shutil.copy(gobuild.build("funclat", GO_A), exe)
    cp = ControlPlane(tmp_path / "cp.db")
    stub = api(cp.address)
    with subprocess.Popen(
        [str(exe), "-mode", "panics", "-goroutines", str(goroutines), "-calls", str(calls)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    ) as fx:
        assert fx.stdout is not None and fx.stdin is not None
        assert fx.stdout.readline().split() == ["ready", str(fx.pid)]
        agent = Agent(
            cp.address,
            "--pid",
            str(fx.pid),
            extra=("--func", "main.safeCall", "main.mayPanic", "main.noSuchFunction", "--panics"),
        )
        try:
            wait_for(lambda: listed(cp.address, fx.pid), "the process in ps", APPEAR_S)
            agent.wait_line(r"--func: no function matches 'main.noSuchFunction'")
            fx.stdin.write("go\n")
            fx.stdin.flush()
            result = json.loads(fx.stdout.readline())
            assert fx.stdout.readline().strip() == "done"
            panics = result["extra"]["recovered"] + result["extra"]["index_recovered"]
            assert result["calls"] == goroutines * calls and panics > 0

            def timed(fn: str) -> int:
                try:
                    r = stub.GetFunctionLatency(
                        q.GetFunctionLatencyRequest(
                            function=fn, selector=q.ProcessSelector(pid=fx.pid)
                        ),
                        timeout=5,
                    )
                except grpc.RpcError:
                    return -1
                return int(r.count)

            n = goroutines * calls
            wait_for(lambda: timed("main.safeCall") == n, f"{n} timed safeCall calls", 10)
            # the calls that panicked never returned: only the others are timed
            assert timed("main.mayPanic") == n - result["extra"]["recovered"]
            row = wait_for(
                lambda: (p := listed(cp.address, fx.pid)) and p["panics"] == panics and p,
                "the panics counted",
            )
            assert row["panics"] == panics
            by_fn = {
                s.labels["function"]: s.value
                for s in agent.scrape()["goleash_panics"]
                if s.name.endswith("_total")
            }
            assert by_fn == {
                "main.mayPanic": result["extra"]["recovered"],
                "main.indexPanic": result["extra"]["index_recovered"],
            }
            counts = {
                s.labels["function"]: s.value
                for s in agent.scrape()["goleash_function_latency_seconds"]
                if s.name.endswith("_count")
            }
            assert counts["main.safeCall"] == n
            (lat,) = cli_json(
                "latency", "--server", cp.address, "--func", "main.safeCall", "--window", "300"
            )["functions"]
            assert (
                lat["symbol"] == "main.safeCall"
                and lat["calls"] == lat["timed"] == n
                and lat["calls_exact"]
            )
            assert 0 < lat["p50_ns"] <= lat["p99_ns"]
        finally:
            stop_both(agent, cp)
            fx.stdin.close()
            fx.wait(timeout=10)
