"""The policy engine inside a real control plane: a policy file hot-reloaded (a bad one
rejected with line and reason while the old one keeps acting), decisions streamed to
a WatchEvents subscriber as a service that switches live would see them, and the
flag-file action done and undone. Agents are simulated over a real gRPC stream."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.server import ControlPlaneConfig
from goleash.embedded import EmbeddedControlPlane
from polling import wait_for

POLICY = """\
mode: enforce
evaluation_interval: 200ms
rules:
  - name: too-many
    services: [shop]
    signal: {{kind: goroutines, above: {above}}}
    sustain: {{consecutive: 2}}
    levels:
      - level: L3
        actions: [{{type: file, path: "{flag}"}}]
    recovery: {{hold: 600ms}}
    cooldown: {{initial: 1s}}
"""


class Agent:
    """Streams one batch per call on one long-lived ingest stream."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.q: queue.Queue[ing.StreamBatchesRequest | None] = queue.Queue()
        self.seq = 0
        stub = ing_grpc.IngestServiceStub(self.channel)

        def requests() -> Iterator[ing.StreamBatchesRequest]:
            while (r := self.q.get()) is not None:
                yield r

        self.thread = threading.Thread(target=stub.StreamBatches, args=(requests(),), daemon=True)
        self.thread.start()

    def send(self, goroutines: int) -> None:
        self.seq += 1
        b = ing.AgentBatch(
            agent=t.AgentIdentity(agent_id="a1", node_name="n1", instance_id="i1"),
            sequence=self.seq,
        )
        b.heartbeat.interval_seconds = 0.2
        if self.seq == 1:
            b.processes_appeared.add(pid=42, start_time_unix_nano=1, service="shop")
        b.snapshots.add(pid=42, goroutines=goroutines)
        self.q.put(ing.StreamBatchesRequest(batch=b))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=5)
        self.channel.close()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[EmbeddedControlPlane, Path, Path]]:
    policy, flag = tmp_path / "policy.yaml", tmp_path / "http2-off.env"
    policy.write_text(POLICY.format(above=100, flag=flag))
    cp = EmbeddedControlPlane(
        ControlPlaneConfig(listen="127.0.0.1:0", db=str(tmp_path), policy_file=str(policy))
    )
    cp.start()
    yield cp, policy, flag
    cp.stop()


def test_policy_file_decisions_on_watch_events_and_a_bad_reload_keeps_the_old_policy(
    plane: tuple[EmbeddedControlPlane, Path, Path],
) -> None:
    cp, policy, flag = plane
    channel = grpc.insecure_channel(cp.address)
    stub = q_grpc.GoleashServiceStub(channel)
    got = stub.GetPolicy(q.GetPolicyRequest())
    assert got.version == 1 and got.source == f"file:{policy}"
    seen: list[t.Event] = []
    kinds = [t.EVENT_KIND_DECISION, t.EVENT_KIND_ACTION, t.EVENT_KIND_POLICY_REJECTED]
    watch = stub.WatchEvents(q.WatchEventsRequest(filter=q.EventFilter(kinds=kinds)))

    def follow() -> None:
        try:
            for r in watch:
                seen.append(r.event)
        except grpc.RpcError:
            pass  # cancelled at the end

    threading.Thread(target=follow, daemon=True).start()
    agent = Agent(cp.address)
    try:
        # a malformed edit of the file: rejected, version 1 keeps running
        policy.write_text(POLICY.format(above="many", flag=flag))
        rejected = wait_for(
            lambda: [e for e in seen if e.kind == t.EVENT_KIND_POLICY_REJECTED],
            "the rejection",
        )
        assert rejected[0].details["line"] == 6
        assert "above must be a number" in rejected[0].details["reason"]
        assert stub.GetPolicy(q.GetPolicyRequest()).version == 1
        # ... and acting: the load goes over 100
        wait_for(lambda: (agent.send(500), flag.exists())[1], "the degrade")
        # the stream delivers the decision on its own thread: the flag can come first
        degrade = wait_for(
            lambda: [e for e in seen if e.kind == t.EVENT_KIND_DECISION],
            "the degrade decision on the stream",
        )[0]
        # what a service that switches live reads from the stream
        assert degrade.service == "shop" and degrade.details["decision"] == "degrade"
        assert degrade.details["http2"] == "off" and degrade.details["to_level"] == "L3"
        assert flag.read_text() == "GODEBUG=http2client=0,http2server=0\n"
        wait_for(lambda: (agent.send(5), not flag.exists())[1], "the recovery")
        wait_for(
            lambda: [
                e
                for e in seen
                if e.kind == t.EVENT_KIND_ACTION and e.details["decision"] == "recover"
            ],
            "the recovery's action on the stream",
        )
        decided = stub.ListDecisions(q.ListDecisionsRequest(service="shop")).decisions
        changes = [
            e.details["decision"]
            for e in decided
            if e.kind == t.EVENT_KIND_DECISION and e.details["decision"] != "hold"
        ]
        assert changes[:2] == ["recover", "degrade"]  # newest first
    finally:
        agent.close()
        watch.cancel()
        channel.close()


def test_cli_policy_check_set_get_override_and_decisions(
    plane: tuple[EmbeddedControlPlane, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from goleash.cli import main

    cp, _, flag = plane
    srv = ["--server", cp.address]
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.format(above="lots", flag=flag))
    assert main(["policy", "check", str(bad)]) == 2
    assert "line 6: above must be a number" in capsys.readouterr().err
    assert main(["policy", "set", str(bad), *srv]) == 2
    assert "the running policy, version 1, is unchanged" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(POLICY.format(above=10_000, flag=flag))
    assert main(["policy", "check", str(good)]) == 0
    assert main(["policy", "set", str(good), *srv]) == 0
    assert "running: version 2 (enforce, 1 rule(s))" in capsys.readouterr().out
    agent = Agent(cp.address)
    try:
        wait_for(lambda: (agent.send(5), cp.cp and "shop" in cp.cp.store.services)[1], "shop")
        assert main(["override", "shop", "degrade", "--reason", "drill", *srv]) == 0
        wait_for(lambda: (agent.send(5), flag.exists())[1], "the forced degrade")
        assert main(["policy", "get", *srv]) == 0
        out = capsys.readouterr().out
        assert "# version 2 from api (enforce)" in out and "force_degrade" in out
        assert main(["override", "shop", "clear", *srv]) == 0
        assert main(["decisions", "--service", "shop", "--json", *srv]) == 0
        out = capsys.readouterr().out
        assert '"forced": true' in out and "manual override (drill)" in out
    finally:
        agent.close()
