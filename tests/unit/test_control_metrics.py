"""The control plane's /metrics for the policy engine: the level each rule holds per
service, decisions, action attempts and failures by type, evaluation durations --
read from a real engine driven through a scenario (tests/engineworld.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engineworld import World
from goleash.control.metrics import ControlCollector, view


def _policy(ok_flag: Path, bad_flag: Path) -> str:
    return textwrap.dedent(f"""
    mode: enforce
    evaluation_interval: 1s
    rules:
      - name: goroutines
        signal: {{kind: goroutines, scope: service}}
        sustain: {{consecutive: 2}}
        levels:
          - {{level: L1, above: 3000, clear_below: 2500}}
          - level: L2
            above: 5000
            clear_below: 4200
            actions: [{{type: file, path: "{ok_flag}"}}, {{type: file, path: "{bad_flag}"}}]
        recovery: {{hold: 5s}}
        cooldown: {{initial: 2s, backoff: 2, max: 60s}}
    """)


def _samples(w: World) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(ControlCollector(lambda: view(w.store, w.events.last_id(), w.now, w.engine)))
    text = generate_latest(reg).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_policy_engine_metrics_follow_a_degrading_service(tmp_path: Path) -> None:
    w = World()
    # the second file action cannot write: its directory is a file
    (tmp_path / "not-a-dir").write_text("")
    w.policy(_policy(tmp_path / "flag", tmp_path / "not-a-dir" / "flag"))
    for n, dt in ((100, 1), (3500, 1), (3600, 1), (5600, 3), (5700, 1), (5800, 1)):
        w.step({"shop": n, "cart": 10}, dt=dt)  # dt 3: past L1's cooldown
    s = _samples(w)
    assert s[("goleash_policy_level", (("rule", "goroutines"), ("service", "shop")))] == 2
    assert s[("goleash_policy_level", (("rule", "goroutines"), ("service", "cart")))] == 0
    up = (("direction", "degrade"), ("mode", "enforce"), ("rule", "goroutines"))
    assert s[("goleash_policy_decisions_total", up)] == 2  # normal -> L1 -> L2
    attempts = {k[1]: v for k, v in s.items() if k[0] == "goleash_policy_action_attempts_total"}
    failures = {k[1]: v for k, v in s.items() if k[0] == "goleash_policy_action_failures_total"}
    assert sum(attempts.values()) >= 2
    assert failures and all(dict(k)["action"] == "file" for k in failures)
    assert sum(failures.values()) < sum(attempts.values())  # the good file was written
    assert (tmp_path / "flag").exists()
    assert s[("goleash_policy_evaluation_seconds_count", ())] == 6
    assert s[("goleash_build_info", (("version", "0.1.0"),))] == 1
