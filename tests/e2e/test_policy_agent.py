"""The policy engine on a real Go service under the real agent (`goleash run`): a
fixture whose goroutine count the test steers over stdin walks the levels
L1 -> L2 -> L3 and back down through hysteresis and hold, each level's flag file
written on the way up and removed on the way down. And the whole story, `make demo`,
which verifies the HTTP/2 -> HTTP/1.1 fallback on the wire and the recovery."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gobuild
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.client import ClientOptions, ControlClient
from polling import wait_for

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]

POLICY = """\
mode: enforce
evaluation_interval: 0.5s
rules:
  - name: levels
    services: [steered]
    signal: {{kind: goroutines, scope: service}}
    sustain: {{consecutive: 2}}
    levels:
      - {{level: L1, above: 100, clear_below: 80, actions: [{{type: file, path: "{d}/L1"}}]}}
      - {{level: L2, above: 300, clear_below: 250, actions: [{{type: file, path: "{d}/L2"}}]}}
      - {{level: L3, above: 600, clear_below: 500, actions: [{{type: file, path: "{d}/L3"}}]}}
    recovery: {{hold: 2s}}
    cooldown: {{initial: 0.5s, backoff: 1}}
  # A witness on the same signal, judged in the same rounds but at once (no sustain):
  # its decisions prove the engine evaluated the values the test steered to, so "levels
  # did not move" is never a vacuous pass, and they time the rounds levels must wait.
  - name: witness
    services: [steered]
    signal: {{kind: goroutines, scope: service}}
    levels:
      - {{level: W1, above: 15, clear_below: 12, actions: [{{type: event}}]}}
      - {{level: W2, above: 100, clear_below: 12, actions: [{{type: event}}]}}
      - {{level: W3, above: 700, clear_below: 560, actions: [{{type: event}}]}}
    recovery: {{hold: 2s}}
    cooldown: {{initial: 0.1s, backoff: 1}}
"""


def _level_changes(api: ControlClient, service: str, rule: str) -> list[tuple[str, str, float]]:
    """(from, to, when in epoch seconds) of each level change `rule` made for `service`,
    oldest first."""
    resp = api.call("ListDecisions", q.ListDecisionsRequest(service=service))
    return [
        (
            e.details["from_level"] or "normal",
            e.details["to_level"] or "normal",
            e.time_unix_nano / 1e9,
        )
        for e in reversed(resp.decisions)  # newest first
        if e.kind == t.EVENT_KIND_DECISION
        and e.details["rule"] == rule
        and e.details["decision"] != "hold"
    ]


def decisions(api: ControlClient, service: str, rule: str) -> list[tuple[str, str]]:
    """(from, to) of each level change `rule` made for `service`, oldest first."""
    return [(a, b) for a, b, _ in _level_changes(api, service, rule)]


def decision_times(api: ControlClient, service: str, rule: str) -> dict[tuple[str, str], float]:
    """(from, to) -> when `rule` first made that level change for `service`."""
    out: dict[tuple[str, str], float] = {}
    for a, b, when in _level_changes(api, service, rule):
        out.setdefault((a, b), when)
    return out


@pytest.fixture
def goleash_run(tmp_path: Path) -> Iterator[ControlClient]:
    log = tmp_path / "goleash.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "goleash.cli", "run", "--listen", "127.0.0.1:0",
             "--db", str(tmp_path), "--exe", "*/steered*", "--interval", "0.5",
             "--health-listen", "off", "--metrics-listen", "off"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    try:
        m = wait_for(
            lambda: (
                re.search(r"control plane listening on (\S+)", log.read_text())
                or (
                    proc.poll() is not None
                    and pytest.fail(f"goleash run exited: {log.read_text()}")
                )
            ),
            "the control plane",
            60,
        )
        with ControlClient(ClientOptions(server=m.group(1))) as client:
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_levels_up_and_back_down_on_a_steered_go_service(
    goleash_run: ControlClient, tmp_path: Path
) -> None:
    api = goleash_run
    flags = tmp_path / "flags"
    api.call("SetPolicy", q.SetPolicyRequest(policy_yaml=POLICY.format(d=flags)))
    binary = gobuild.build("steered", gobuild.TOOLCHAINS[-1])
    go = subprocess.Popen(
        [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert go.stdin is not None and go.stdout is not None
    try:
        assert go.stdout.readline().startswith("ready")

        def steer(n: int) -> None:
            go.stdin.write(f"{n}\n")  # type: ignore[union-attr]
            assert go.stdout.readline().strip() == f"ok {n}"  # type: ignore[union-attr]

        def level() -> str:
            path = decisions(api, "steered", "levels")
            return path[-1][1] if path else "normal"

        def goroutines() -> int:
            procs = api.call("ListProcesses", q.ListProcessesRequest()).processes
            return next((p.goroutines for p in procs if p.info.service == "steered"), -1)

        baseline = wait_for(lambda: (n := goroutines()) >= 0 and n + 1, "the agent to follow") - 1
        assert baseline < 12, "the witness's W1 must start clear"
        steer(20)
        # The witness reached W1: the engine evaluated 20 goroutines, and the levels
        # rule (over 100 only) stayed normal.
        wait_for(lambda: ("normal", "W1") in decisions(api, "steered", "witness"), "W1 at 20")
        assert level() == "normal"
        for n, want in ((200, "L1"), (400, "L2"), (800, "L3")):
            steer(n)
            wait_for(lambda want=want: level() == want, f"{want} at {n} goroutines")
            # actions run after the decision is logged, on the action runner
            wait_for(lambda want=want: (flags / want).exists(), f"the {want} flag file")
        # Sustain: L1 came at least one round (0.5 s) after the first round that saw 200
        # goroutines, the one where the witness went to W2.
        witness, levels = (decision_times(api, "steered", r) for r in ("witness", "levels"))
        assert levels[("normal", "L1")] - witness[("W1", "W2")] >= 0.25
        wait_for(lambda: ("W2", "W3") in decisions(api, "steered", "witness"), "W3 at 800")
        # Between L3's clear threshold (500) and its threshold (600): hysteresis holds
        # L3. The witness clears under 560 with the same hold: once it stepped down, the
        # engine has judged 550 for as long as L3 would need to recover.
        steer(550)
        wait_for(lambda: ("W3", "W2") in decisions(api, "steered", "witness"), "W3 -> W2 at 550")
        assert level() == "L3" and (flags / "L3").exists()
        steer(450)  # under L3's clear, above L2's threshold: down to L2 after the hold
        steered_at = time.time()
        wait_for(lambda: level() == "L2", "L3 -> L2")
        # Hold: not before 2 s under the clear threshold, counted from when it was.
        held_for = decision_times(api, "steered", "levels")[("L3", "L2")] - steered_at
        assert held_for >= 2.0, f"L3 -> L2 {held_for:.2f}s after the count went under 500"
        wait_for(lambda: not (flags / "L3").exists(), "the L3 flag file removed")
        assert (flags / "L2").exists()
        steer(10)
        wait_for(lambda: level() == "normal", "back to normal")
        wait_for(lambda: not any(flags.iterdir()), "every flag file removed")
        assert decisions(api, "steered", "levels") == [
            ("normal", "L1"),
            ("L1", "L2"),
            ("L2", "L3"),
            ("L3", "L2"),
            ("L2", "normal"),
        ]
        decided = api.call("ListDecisions", q.ListDecisionsRequest(service="steered")).decisions
        actions = [
            (e.details["operation"], Path(e.details["target"]).name, e.details["ok"])
            for e in reversed(decided)
            if e.kind == t.EVENT_KIND_ACTION and e.details["rule"] == "levels"
        ]
        assert actions == [
            ("apply", "L1", True),
            ("apply", "L2", True),
            ("apply", "L3", True),
            ("undo", "L3", True),
            ("undo", "L2", True),
            ("undo", "L1", True),
        ]
    finally:
        go.kill()
        go.wait()


BLAST = """\
mode: enforce
evaluation_interval: 0.5s
blast_radius: {{max_services: 2}}
rules:
  - name: too-many
    services: ["steered-*"]
    signal: {{kind: goroutines, above: 300}}
    levels: [{{level: L3, actions: [{{type: file, path: "{d}/{{service}}"}}]}}]
    cooldown: {{initial: 0.5s}}
  # A witness: notify-only, so the blast radius does not count it. Its decision proves
  # the engine went on evaluating for four rounds at the value the test steered to.
  - name: witness
    services: ["steered-*"]
    signal: {{kind: goroutines, above: 700}}
    sustain: {{consecutive: 4}}
    levels: [{{level: W, actions: [{{type: event}}]}}]
"""


def test_blast_radius_and_no_data_with_several_real_services(
    goleash_run: ControlClient, tmp_path: Path
) -> None:
    api, flags = goleash_run, tmp_path / "flags"
    api.call("SetPolicy", q.SetPolicyRequest(policy_yaml=BLAST.format(d=flags)))
    built = gobuild.build("steered", gobuild.TOOLCHAINS[-1])
    procs = {}
    try:
        for name in ("steered-a", "steered-b", "steered-c"):
            exe = tmp_path / name  # the executable's name is the service's name
            exe.write_bytes(built.read_bytes())
            exe.chmod(0o755)
            procs[name] = subprocess.Popen(
                [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
            assert procs[name].stdout.readline().startswith("ready")  # type: ignore[union-attr]

        def running() -> set[str]:
            ps = api.call("ListProcesses", q.ListProcessesRequest()).processes
            return {p.info.service for p in ps if p.state == q.PROCESS_STATE_RUNNING}

        wait_for(lambda: set(procs) <= running(), "the agent to follow all three", 60)

        def held() -> list[str]:
            resp = api.call("ListDecisions", q.ListDecisionsRequest(service="steered-c"))
            return [e.message for e in resp.decisions if "blast radius" in e.message]

        def flagged() -> list[str]:
            return sorted(p.name for p in flags.iterdir()) if flags.exists() else []

        # a, then b, then c cross the threshold, each once the previous one was judged
        for name in sorted(procs):
            procs[name].stdin.write("500\n")  # type: ignore[union-attr]
            procs[name].stdout.readline()  # type: ignore[union-attr]
            if name == "steered-c":
                # the engine judged steered-c over its threshold and held it at the cap
                wait_for(held, "steered-c held by the blast radius")
            else:
                wait_for(lambda name=name: name in flagged(), f"{name} degraded")
        assert flagged() == ["steered-a", "steered-b"]
        # steered-a's process dies: no data for it, so it holds (degraded), never recovers
        # on a guess, and the cap still counts it
        procs["steered-a"].kill()
        procs["steered-a"].wait()
        wait_for(lambda: "steered-a" not in running(), "steered-a gone")
        # Four more rounds of evaluation, all after steered-a died: steered-b over the
        # witness's threshold (and still over too-many's) until the witness fires.
        procs["steered-b"].stdin.write("800\n")  # type: ignore[union-attr]
        procs["steered-b"].stdout.readline()  # type: ignore[union-attr]
        wait_for(
            lambda: ("normal", "W") in decisions(api, "steered-b", "witness"),
            "four evaluations of steered-b at 800",
        )
        assert flagged() == ["steered-a", "steered-b"]
        # steered-b recovers: now steered-c may degrade
        procs["steered-b"].stdin.write("10\n")  # type: ignore[union-attr]
        wait_for(
            lambda: sorted(p.name for p in flags.iterdir()) == ["steered-a", "steered-c"],
            "steered-b recovered and steered-c degraded",
        )
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


@pytest.mark.skipif(os.environ.get("GOLEASH_SKIP_DEMO") == "1", reason="GOLEASH_SKIP_DEMO=1")
def test_make_demo_tells_the_whole_story_and_exits_0(tmp_path: Path) -> None:
    """HTTP/2 -> HTTP/1.1 on a congested link, seen on the wire by the server, and back."""
    env = {**os.environ, "GOLEASH_DEMO_DIR": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "goleash.demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    out = res.stdout
    for line in (
        "goroutines climb",
        "orphans appear with their creation site",
        "the policy fires",
        "the server observes HTTP/1.1 on the wire",
        "the client is back on HTTP/2",
        "every step observed",
    ):
        assert line in out
    (workdir,) = tmp_path.iterdir()
    assert (workdir / "report" / "flamegraph.svg").read_text().startswith("<svg")
    # every process the demo started is gone
    left = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
