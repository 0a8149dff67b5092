"""The policy engine on plain data: levels, sustain, hysteresis, cooldown, blast radius,
modes, no-data holds, overrides, baselines, and the policy gate's line numbers.

The Store is fed agent batches as the ingest path would; time is passed in, so a
five-minute scenario runs in milliseconds. Actions are real (flag files in tmp_path)
and run inline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engineworld import World
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.control.policy import PolicyError, validate_policy
from goleash.control.rules import compile_document


def levels_policy(flag: Path, mode: str = "enforce", extra: str = "") -> str:
    return f"""
    mode: {mode}
    evaluation_interval: 1s
    {extra}
    rules:
      - name: goroutines
        signal: {{kind: goroutines, scope: service}}
        sustain: {{consecutive: 2}}
        levels:
          - {{level: L1, above: 3000, clear_below: 2500}}
          - {{level: L2, above: 5000, clear_below: 4200}}
          - level: L3
            above: 8000
            clear_below: 6500
            actions: [{{type: file, path: "{flag}"}}]
        recovery: {{hold: 5s}}
        cooldown: {{initial: 2s, backoff: 2, max: 60s}}
    """


def test_levels_go_up_with_sustain_and_down_with_hysteresis_and_hold(tmp_path: Path) -> None:
    w, flag = World(), tmp_path / "http2-off.env"
    w.policy(levels_policy(flag))
    w.step({"shop": 100})
    w.step({"shop": 3500})
    assert w.decisions() == []  # one evaluation above L1 is not sustained yet
    w.step({"shop": 3600})
    w.step({"shop": 5600}, dt=3)
    w.step({"shop": 5700})
    w.step({"shop": 9000}, dt=3)
    assert not flag.exists()
    w.step({"shop": 9100})
    assert [(d["from_level"], d["to_level"]) for d in w.decisions()] == [
        ("", "L1"),
        ("L1", "L2"),
        ("L2", "L3"),
    ]
    assert flag.read_text() == "GODEBUG=http2client=0,http2server=0\n"
    # under L3's clear threshold but above L2's: after the hold, down to L2 only
    w.step({"shop": 6000}, dt=3)
    for _ in range(4):
        w.step({"shop": 6000})
    assert w.decisions()[-1]["to_level"] == "L3"  # 4 s < hold
    w.step({"shop": 6000})
    assert (w.decisions()[-1]["from_level"], w.decisions()[-1]["to_level"]) == ("L3", "L2")
    assert not flag.exists()  # L3's action undone on the way down
    # between clear_below and above of L2 (4500): hysteresis keeps L2
    for _ in range(10):
        w.step({"shop": 4500})
    assert w.decisions()[-1]["to_level"] == "L2"
    for _ in range(7):
        w.step({"shop": 10})
    assert (w.decisions()[-1]["from_level"], w.decisions()[-1]["to_level"]) == ("L2", "")
    acts = [(a["operation"], a["ok"], a["action"]) for a in w.actions() if a["action"] == "file"]
    assert acts == [("apply", True, "file"), ("undo", True, "file")]
    # the decision carries its evidence
    d = w.decisions()[2]
    assert d["evidence"]["goroutines"] == 9100
    assert d["evidence"]["sites"][0]["go_statement"] == "/src/main.go:42"


def test_sustain_window_needs_the_whole_duration(tmp_path: Path) -> None:
    w = World()
    w.policy(
        """
        mode: enforce
        rules:
          - name: g
            signal: {kind: goroutines, above: 10}
            sustain: {window: 10s}
        """
    )
    for _ in range(10):
        w.step({"s": 50})
    assert w.decisions() == []
    w.step({"s": 5})  # one dip restarts the window
    for _ in range(10):
        w.step({"s": 50})
    assert w.decisions() == []
    w.step({"s": 50})
    assert [d["to_level"] for d in w.decisions()] == ["L1"]


def test_monitor_mode_records_what_it_would_do_and_does_nothing(tmp_path: Path) -> None:
    w, flag = World(), tmp_path / "flag"
    w.policy(levels_policy(flag, mode="monitor"))
    for _ in range(3):
        w.step({"shop": 9000})
    (d,) = w.decisions()
    assert d["to_level"] == "L3" and d["dry_run"] is True and d["applied"] is False
    assert d["actions"][-1] == f"file {flag}"  # L1 and L2 only record events
    assert not flag.exists() and w.actions() == []


def test_off_mode_evaluates_nothing(tmp_path: Path) -> None:
    w = World()
    w.policy(levels_policy(tmp_path / "f", mode='"off"'))  # YAML 1.1 reads a bare off as false
    for _ in range(5):
        w.step({"shop": 9000})
    assert w.decisions(changes_only=False) == []


def test_a_flapping_signal_acts_at_most_once_per_cooldown_with_backoff(tmp_path: Path) -> None:
    w, flag = World(), tmp_path / "flag"
    w.policy(
        f"""
        mode: enforce
        rules:
          - name: flappy
            signal: {{kind: goroutines, above: 100}}
            levels: [{{level: L3, actions: [{{type: file, path: "{flag}"}}]}}]
            cooldown: {{initial: 10s, backoff: 2, max: 300s}}
        """
    )
    for i in range(120):  # above and below every other second for two minutes
        w.step({"s": 500 if i % 2 == 0 else 10})
    times = [d["time"] for d in w.decisions()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) >= 3
    assert all(g >= 10 for g in gaps)  # never two actions within the cooldown
    assert gaps[1] >= 20 and gaps[2] >= 40  # and the cooldown backs off
    holds = [d for d in w.decisions(changes_only=False) if "cooldown" in d.get("reason", "")]
    # the waits are recorded, once per wait (not at every evaluation)
    assert len(times) - 1 <= len(holds) <= 2 * len(times)


def test_blast_radius_caps_how_many_services_are_degraded_at_once(tmp_path: Path) -> None:
    w = World()
    w.policy(
        f"""
        mode: enforce
        blast_radius: {{max_services: 2, max_percent: 50}}
        rules:
          - name: g
            signal: {{kind: goroutines, above: 100}}
            levels: [{{level: L3, actions: [{{type: file, path: "{tmp_path}/{{service}}"}}]}}]
            cooldown: {{initial: 0s}}
        """
    )
    services = {f"svc{i}": 10 for i in range(5)}
    w.step(services)
    w.step({k: 1000 for k in services})
    degraded = sorted(d["service"] for d in w.decisions())
    assert degraded == ["svc0", "svc1"]  # 50 % of 5 rounds down to 2; max_services 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc0", "svc1"]
    held = [d for d in w.decisions(changes_only=False) if "blast radius" in d.get("reason", "")]
    assert sorted(d["service"] for d in held) == ["svc2", "svc3", "svc4"]
    # one recovers: the next one may degrade
    w.step({**{k: 1000 for k in services}, "svc0": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc1", "svc2"]


def test_no_data_holds_the_state_and_never_acts(tmp_path: Path) -> None:
    w, flag = World(), tmp_path / "flag"
    w.policy(levels_policy(flag))
    w.step({"shop": 9000})
    w.step({"shop": 9000})
    assert flag.exists()
    # the agent stops reporting: the process goes stale; no recovery without data
    w.now += 60
    for _ in range(20):
        w.now += 1
        w.engine.evaluate(w.now)
    assert flag.exists()
    holds = [d for d in w.decisions(changes_only=False) if d["decision"] == "hold"]
    assert [h["reason"] for h in holds] == ["no data: holding the degraded state"]
    # a service never seen with data does not degrade either
    w2 = World()
    w2.policy(levels_policy(flag))
    w2.now += 1
    w2.engine.evaluate(w2.now)
    assert w2.decisions() == []


READFRAME = "net/http.(*http2Framer).ReadFrame"
ROUNDTRIP = "net/http.(*Transport).roundTrip"


def test_latency_jump_over_baseline_degrades_and_a_recovery_signal_recovers(
    tmp_path: Path,
) -> None:
    w, flag = World(), tmp_path / "flag"
    w.policy(
        f"""
        mode: enforce
        evaluation_interval: 2s
        rules:
          - name: readframe
            services: [client]
            signal:
              kind: function_latency
              function: "*http2*Framer).ReadFrame"  # any release's package path
              quantile: p99
              window: 10s
              over_baseline: 100ms
              baseline_window: 120s
            sustain: {{consecutive: 2}}
            levels: [{{level: L3, actions: [{{type: file, path: "{flag}"}}]}}]
            recovery:
              hold: 6s
              signal: {{kind: function_latency, function: {ROUNDTRIP}, window: 10s, below: 50ms}}
            cooldown: {{initial: 5s}}
        """
    )
    fast = {READFRAME: [2_000_000] * 50, ROUNDTRIP: [3_000_000] * 50}
    for _ in range(10):  # 20 s of a 2 ms baseline
        w.step({"client": 10}, dt=2, latency={"client": fast})
    assert w.decisions(changes_only=True) == []
    slow = {READFRAME: [400_000_000] * 50, ROUNDTRIP: [500_000_000] * 50}
    for _ in range(10):
        w.step({"client": 10}, dt=2, latency={"client": slow})
        if w.decisions():
            break
    (d,) = w.decisions()
    assert d["to_level"] == "L3" and flag.exists()
    assert d["evidence"]["baseline"] < 0.01 and d["evidence"]["measured"] > 0.3
    lat = {x["function"]: x for x in d["evidence"]["latency"]}
    assert lat[READFRAME]["count"] > 0 and lat[READFRAME]["histogram"]
    assert READFRAME in d["evidence"]["latency_histogram_text"]
    # HTTP/1.1 now: no ReadFrame at all; roundTrip slow for a while, then fast again
    for _ in range(10):
        w.step({"client": 10}, dt=2, latency={"client": {ROUNDTRIP: [300_000_000] * 50}})
    assert flag.exists()
    for _ in range(12):
        w.step({"client": 10}, dt=2, latency={"client": {ROUNDTRIP: [3_000_000] * 50}})
    assert w.decisions()[-1]["decision"] == "recover" and not flag.exists()


def test_overrides_pause_force_degrade_and_force_recover(tmp_path: Path) -> None:
    w, flag = World(), tmp_path / "flag"
    w.policy(levels_policy(flag))
    w.step({"shop": 10})
    w.policies.add_override("shop", q.OVERRIDE_ACTION_FORCE_DEGRADE, "", "L3", "drill", 0)
    w.step({"shop": 10})
    assert w.decisions()[-1]["to_level"] == "L3" and w.decisions()[-1]["forced"]
    assert flag.exists()
    w.policies.clear_overrides("shop")
    w.policies.add_override("shop", q.OVERRIDE_ACTION_FORCE_RECOVER, "", "", "all clear", 0)
    for _ in range(5):
        w.step({"shop": 9000})
    assert w.decisions()[-1]["to_level"] == "" and not flag.exists()
    w.policies.clear_overrides("shop")
    w.policies.add_override("shop", q.OVERRIDE_ACTION_PAUSE_RULE, "goroutines", "", "", 0)
    n = len(w.decisions())
    for _ in range(10):
        w.step({"shop": 9000}, dt=3)
    assert len(w.decisions()) == n and not flag.exists()


def test_two_rules_sharing_an_action_apply_it_once_and_undo_it_last(tmp_path: Path) -> None:
    w, flag = World(), tmp_path / "flag"
    w.policy(
        f"""
        mode: enforce
        actions:
          http2-off: {{type: file, path: "{flag}"}}
        rules:
          - name: many
            signal: {{kind: goroutines, above: 100}}
            levels: [{{level: L3, actions: [http2-off]}}]
            cooldown: {{initial: 1s}}
          - name: orphans
            signal: {{kind: orphans, above: 5}}
            levels: [{{level: L3, actions: [http2-off]}}]
            cooldown: {{initial: 1s}}
        """
    )
    w.step({"s": 500}, orphans={"s": 50})
    assert flag.exists()
    w.step({"s": 10}, orphans={"s": 50}, dt=2)  # goroutines rule recovers, orphans holds
    assert [d["rule"] for d in w.decisions()] == ["many", "orphans", "many"]
    assert flag.exists()
    w.step({"s": 10}, dt=2)
    assert not flag.exists()
    ops = [a["operation"] for a in w.actions()]
    assert ops == ["apply", "undo"]


def test_a_restarted_control_plane_still_recovers_what_it_degraded(tmp_path: Path) -> None:
    db, flag = str(tmp_path / "cp.db"), tmp_path / "flag"
    w = World(db)
    w.policy(levels_policy(flag))
    w.step({"shop": 9000})
    w.step({"shop": 9000})
    assert flag.exists()
    w2 = World(db)  # same database: the policy and the event log survive
    w2.now = w.now
    for _ in range(8):
        w2.step({"shop": 10})
    assert not flag.exists()
    assert [(d["from_level"], d["to_level"]) for d in w2.decisions()][-1] == ("L3", "")


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("rules:\n  - name: a\n    signal: {kind: goroutine}\n", 3, "signal kind must be one of"),
        (
            "rules:\n  - name: a\n    signal:\n      kind: goroutines\n      above: lots\n",
            5,
            "above must be a number",
        ),
        (
            "rules:\n  - name: a\n    signal: {kind: function_latency, above: 1s}\n",
            3,
            "needs function:",
        ),
        (
            "rules:\n  - name: a\n    signal: {kind: goroutines}\n    sustain: {window: soon}\n",
            4,
            "duration like 30s",
        ),
        (
            "rules:\n  - name: a\n    signal: {kind: goroutines}\n    levels:\n"
            "      - {level: L1, above: 10}\n      - {level: L2, above: 5}\n",
            6,
            "levels go up",
        ),
        (
            "rules:\n  - name: a\n    signal: {kind: goroutines, above: 3}\n    levels:\n"
            "      - level: L1\n        actions:\n          - {type: webhook, url: ftp://x}\n",
            7,
            "webhook action: a webhook action needs url",
        ),
        (
            "rules:\n  - name: a\n    signal: {kind: goroutines, above: 3}\n    levels:\n"
            "      - level: L1\n        actions:\n          - type: teleport\n",
            7,
            "action type must be one of",
        ),
        ("blast_radius: {max_services: 0}\n", 1, "max_services must be"),
        (
            "rules:\n  - name: a\n    signal: {kind: goroutines}\n    sustian: {}\n",
            4,
            "unknown key 'sustian'",
        ),
    ],
)
def test_malformed_policies_name_the_line_and_the_reason(body: str, line: int, reason: str) -> None:
    text = "mode: enforce\n" + body
    with pytest.raises(PolicyError) as info:
        compile_document(validate_policy(text))
    assert (info.value.line, reason in info.value.reason) == (line + 1, True), info.value


def test_the_shipped_deploy_policy_compiles() -> None:
    text = (Path(__file__).resolve().parents[2] / "deploy/kubernetes/policy.yaml").read_text()
    pol = compile_document(validate_policy(text))
    goroutines = pol.rules[0]
    assert [(lv.name, lv.above) for lv in goroutines.levels] == [
        ("L1", 3000),
        ("L2", 5000),
        ("L3", 8000),
    ]
    assert pol.mode == "monitor" and pol.allowed_degraded(100) == 3
