"""Policy gate, policy/override persistence and the SQLite event log."""

from __future__ import annotations

from pathlib import Path

import pytest

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.events import EventLog, EventQuery, open_db, resolve_db_path
from goleash.control.policy import PolicyError, PolicyStore, validate_policy

GOOD = """\
mode: enforce
rules:
  - name: goroutines
    signal: {kind: goroutines, scope: service}
  - name: readframe
    signal:
      kind: function_latency
      function: net/http.(*http2Framer).ReadFrame
      over_baseline: 300ms
"""


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (
            "mode: enforce\nrules:\n  - name: a\n    signal: x\n  - name: a\n    signal: y\n",
            5,
            "used twice",
        ),
        ("mode: enforce\nrulez: []\n", 2, "unknown key 'rulez'"),
        ("mode: sometimes\n", 1, "mode must be one of"),
        ("mode: enforce\nrules:\n  - name: a\n   signal: x\n", 4, "not valid YAML"),
        ("mode: enforce\nrules:\n  - signal: x\n", 3, "needs a name"),
        ("mode: enforce\nrules:\n  - name: a\n", 3, "needs a signal"),
        ("rules: 3\n", 1, "rules must be a list"),
        ("- just\n- a list\n", 1, "a policy is a mapping"),
    ],
)
def test_bad_policies_are_rejected_with_line_and_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy(text)
    assert info.value.line == line
    assert reason in info.value.reason
    assert str(info.value).startswith(f"line {line}: ")


def test_a_good_policy_passes() -> None:
    doc = validate_policy(GOOD)
    assert doc.mode == "enforce" and [r["name"] for r in doc.rules] == ["goroutines", "readframe"]


def test_policy_versions_and_overrides_survive_a_restart(tmp_path: Path) -> None:
    db = resolve_db_path(tmp_path)
    store = PolicyStore(open_db(db), clock=lambda: 100.0)
    assert store.current is None
    assert store.set(GOOD, "api").version == 1
    with pytest.raises(PolicyError):
        store.set("mode: nope\n", "api")
    assert store.current is not None and store.current.version == 1  # the old one keeps running
    store.add_override("shop", q.OVERRIDE_ACTION_FORCE_DEGRADE, "", "L2", "incident", 0)
    store.add_override("shop", q.OVERRIDE_ACTION_PAUSE_RULE, "goroutines", "", "", 50)
    again = PolicyStore(open_db(db), clock=lambda: 120.0)
    assert again.current is not None and again.current.document.mode == "enforce"
    assert again.current.version == 1 and again.current.source == "api"
    assert [o.action for o in again.active_overrides("shop")] == [
        q.OVERRIDE_ACTION_FORCE_DEGRADE,
        q.OVERRIDE_ACTION_PAUSE_RULE,
    ]
    later = PolicyStore(open_db(db), clock=lambda: 200.0)  # the 50 s pause has expired
    assert [o.action for o in later.active_overrides()] == [q.OVERRIDE_ACTION_FORCE_DEGRADE]
    assert later.clear_overrides("shop") == 1 and not later.active_overrides()


def test_event_log_keeps_events_across_reopen_and_filters(tmp_path: Path) -> None:
    db = str(tmp_path / "events.db")
    log = EventLog(open_db(db), clock=lambda: 1.5)
    got = []
    unsubscribe = log.subscribe(got.append)
    log.append(t.EVENT_KIND_PROCESS_APPEARED, "shop up", service="shop", pid=10)
    log.append(
        t.EVENT_KIND_ORPHANS_APPEARED,
        "orphans",
        service="shop",
        pid=10,
        details={"count": 3, "function": "main.leak"},
    )
    unsubscribe()
    log.append(t.EVENT_KIND_PROCESS_APPEARED, "cart up", service="cart", pid=11)
    assert [e.id for e in got] == [1, 2]
    reopened = EventLog(open_db(db))
    assert reopened.last_id() == 3
    assert [e.message for e in reopened.query()] == ["shop up", "orphans", "cart up"]
    shop = reopened.query(EventQuery(service="shop"), newest_first=True)
    assert [e.id for e in shop] == [2, 1]
    assert shop[0].details == {"count": 3, "function": "main.leak"} and shop[0].time == 1.5
    kinds = EventQuery(kinds=frozenset({t.EVENT_KIND_PROCESS_APPEARED}))
    assert [e.id for e in reopened.query(kinds, after_id=1)] == [3]
    nxt = reopened.append(t.EVENT_KIND_PROCESS_GONE, "cart down", service="cart")
    assert nxt.id == 4  # ids continue, never reused
