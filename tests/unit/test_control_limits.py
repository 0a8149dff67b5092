"""Caps and validation of the control plane's data half, on plain data: what an agent
can make the Store hold, policy and override values, action targets, the bounded
action pool, event retention, and agent names in reports and terminals."""

from __future__ import annotations

import math
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agentsim import SimAgent, goroutine, process_info, site, snapshot
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.control import answers, flamegraph, views
from goleash.control.actions import (
    DEGRADE,
    Action,
    ActionContext,
    ActionSpecError,
    Attempt,
    build_action,
    run_action,
)
from goleash.control.actions.flagfile import FileAction
from goleash.control.actions.kubernetes import KubernetesAction
from goleash.control.engine import ThreadRunner
from goleash.control.events import EventLog, open_db
from goleash.control.histogram import bucket_bounds
from goleash.control.limits import (
    DEFAULT_LIMITS,
    MAX_BUCKET_INDEX,
    InvalidArgument,
    ResourceExhausted,
    check_service,
)
from goleash.control.policy import PolicyError, check_override, validate_policy
from goleash.control.state import Store

T0 = 1_000_000.0
SITE = ("main.handler.func1", "/src/shop/main.go:42")


def quiet(*_: Any, **__: Any) -> None:
    pass


def fingerprint(store: Store) -> tuple[Any, ...]:
    return (
        {
            k: (a.last_sequence, a.batches, dict(a.drops), set(a.procs))
            for k, a in store.agents.items()
        },
        {k: (p.goroutines, set(p.sites), set(p.latency)) for k, p in store.procs.items()},
        {k: (s.goroutines, set(s.sites)) for k, s in store.services.items()},
    )


# --- the Store's caps ----------------------------------------------------------------------


def test_a_batch_over_a_cap_is_refused_before_anything_changes() -> None:
    limits = replace(DEFAULT_LIMITS, sites_per_agent=10, sites_per_process=8)
    store = Store(quiet, limits=limits)
    a = SimAgent("a1")
    store.ingest(a.batch(appeared=[process_info(1, "shop"), process_info(2, "shop")]), T0)
    six = [site(f"main.f{i}", f"a.go:{i}", live=1) for i in range(6)]
    store.ingest(a.batch(snapshots=[snapshot(1, six)]), T0 + 1)
    before = fingerprint(store)
    # 6 + 6 sites over the agent's 10; the first snapshot alone would fit
    too_many = a.batch(snapshots=[snapshot(1, six[:1]), snapshot(2, six)], sequence=3)
    too_many.snapshots[0].goroutines = 99
    with pytest.raises(ResourceExhausted, match="sites"):
        store.ingest(too_many, T0 + 2)
    assert fingerprint(store) == before
    nine = [site(f"main.g{i}", "b.go:1", live=1) for i in range(9)]
    with pytest.raises(ResourceExhausted, match="sites in one snapshot"):
        store.ingest(a.batch(snapshots=[snapshot(2, nine)], sequence=3), T0 + 2)
    assert fingerprint(store) == before


def test_the_number_of_agents_is_capped_and_silent_agents_are_forgotten() -> None:
    events: list[str] = []
    store = Store(
        lambda kind, msg, **kw: events.append(msg), limits=replace(DEFAULT_LIMITS, agents=2)
    )
    for name in ("a", "b"):
        a = SimAgent(name)
        store.ingest(a.batch(appeared=[process_info(1, f"svc-{name}")]), T0)
    with pytest.raises(ResourceExhausted, match="agents"):
        store.ingest(SimAgent("c").batch(), T0)
    store.stream_opened(store.agents["a"].identity, T0)  # "a" still has a stream open
    store.prune(T0 + DEFAULT_LIMITS.agent_ttl_seconds + 1)
    assert set(store.agents) == {"a"} and ("b", 1) not in store.procs
    assert not store.services["svc-b"].procs
    assert any("forgotten" in e for e in events)
    assert store.ingest(SimAgent("c").batch(), T0 + 4000)  # room again


def test_a_sequence_jump_is_refused_but_a_restarted_agent_starts_over() -> None:
    store = Store(quiet)
    a = SimAgent("a1")
    store.ingest(a.batch(), T0)
    with pytest.raises(InvalidArgument, match="jumps"):
        store.ingest(a.batch(sequence=2 + DEFAULT_LIMITS.sequence_jump), T0)
    with pytest.raises(InvalidArgument, match="beyond"):
        store.ingest(a.batch(sequence=2**64 - 1), T0)
    with pytest.raises(InvalidArgument, match="beyond"):
        store.ingest(a.batch(sequence=2**41), T0)
    assert store.ingest(a.batch(sequence=2), T0)
    a.restart()
    assert store.ingest(a.batch(sequence=1000), T0)


def test_the_whole_store_has_a_ceiling_of_sites_and_processes() -> None:
    store = Store(quiet, limits=replace(DEFAULT_LIMITS, sites_total=10, processes_total=3))
    for name in ("a", "b"):
        a = SimAgent(name)
        store.ingest(a.batch(appeared=[process_info(1, "x")]), T0)
        six = [site(f"{name}.f{i}", "a.go:1", live=1) for i in range(6 if name == "a" else 5)]
        if name == "a":
            store.ingest(a.batch(snapshots=[snapshot(1, six)]), T0)
        else:
            with pytest.raises(ResourceExhausted, match="sites of all agents"):
                store.ingest(a.batch(snapshots=[snapshot(1, six)]), T0)
    assert store.sites_held == 6
    with pytest.raises(ResourceExhausted, match="processes of all agents"):
        store.ingest(SimAgent("c").batch(appeared=[process_info(1, "x"), process_info(2, "x")]), T0)


def test_too_many_functions_per_process_are_refused() -> None:
    store = Store(quiet, limits=replace(DEFAULT_LIMITS, functions_per_process=2))
    a = SimAgent("a1")
    store.ingest(a.batch(appeared=[process_info(1, "shop")]), T0)
    store.ingest(a.batch(snapshots=[snapshot(1, latency={"f1": [10], "f2": [10]})]), T0)
    with pytest.raises(ResourceExhausted, match="traced functions"):
        store.ingest(a.batch(snapshots=[snapshot(1, latency={"f3": [10]})]), T0)


def test_new_drop_reasons_beyond_the_cap_fold_into_one() -> None:
    store = Store(quiet, limits=replace(DEFAULT_LIMITS, drop_reasons=3))
    a = SimAgent("a1")
    for i in range(3):
        store.ingest(a.batch(drops={f"r{i}": 1, f"s{i}": 1}), T0)
    assert dict(store.agents["a1"].drops) == {"r0": 1, "s0": 1, "r1": 1, "other_reasons": 3}


def test_histogram_buckets_must_lie_inside_64_bit_nanoseconds() -> None:
    for bits, top in MAX_BUCKET_INDEX.items():
        assert bucket_bounds(top, bits)[0] < 2**64 <= bucket_bounds(top + 1, bits)[0]
    store = Store(quiet)
    a = SimAgent("a1")
    snap = snapshot(1, latency={"f": [10]})
    snap.latency[0].histogram.buckets.add(index=MAX_BUCKET_INDEX[3] + 1, count=1)
    with pytest.raises(InvalidArgument, match="beyond 2\\^64"):
        store.ingest(a.batch(appeared=[process_info(1, "x")], snapshots=[snap]), T0)
    assert not store.agents


@pytest.mark.parametrize(
    "name",
    ["shop/checkout", "kube-system/coredns", "my_server", "server.v2", "a" * 253],
)
def test_service_names_that_pass(name: str) -> None:
    check_service(name)


@pytest.mark.parametrize(
    "name",
    ["Shop/checkout", "shop/../etc", "shop/", "/x", "a" * 254, "ns/" + "b" * 254, "bad\x1bname"],
)
def test_service_names_that_do_not(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_service(name)


def test_deep_stacks_and_extra_goroutines_are_cut_and_counted() -> None:
    store = Store(quiet, limits=replace(DEFAULT_LIMITS, kept_goroutines=2, stack_depth=5))
    a = SimAgent("a1")
    g = goroutine(1, *SITE, age=1)
    for i in range(50):
        g.stack.add(function=f"f{i}")
    kept = [g, goroutine(2, *SITE, age=1), goroutine(3, *SITE, age=1)]
    store.ingest(a.batch(appeared=[process_info(1, "x")]), T0)
    store.ingest(a.batch(snapshots=[snapshot(1, [site(*SITE, live=3)], kept=kept)]), T0)
    p = store.procs[("a1", 1)]
    assert len(p.kept) == 2 and len(p.kept[0].stack) == 5
    assert dict(p.drops) == {"kept_goroutines_over_cap": 1, "stack_frames_over_cap": 1}


def test_list_responses_stay_under_the_message_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answers, "MAX_RESPONSE_BYTES", 2000)
    store = Store(quiet)
    for i in range(100):
        store.ingest(SimAgent(f"agent-{i:03d}").batch(appeared=[process_info(1, "x")]), T0)
    agents = answers.list_agents(store, T0)
    assert 0 < len(agents.agents) < 100 and agents.ByteSize() <= 2000
    procs = answers.list_processes(store, q.ListProcessesRequest(), T0)
    assert 0 < len(procs.processes) < 100 and procs.total_size == 100


# --- policies and overrides --------------------------------------------------------------


BASE = "mode: monitor\nrules:\n  - name: g\n    signal: {kind: goroutines, above: 10}\n"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("evaluation_interval: .inf\n" + BASE, 1, "finite"),
        ("evaluation_interval: .nan\n" + BASE, 1, "finite"),
        ("evaluation_interval: 2h\n" + BASE, 1, "between 100ms and 1h"),
        (BASE.replace("10}", ".nan}"), 4, "finite"),
        (BASE.replace("10}", "-.inf}"), 4, "finite"),
        (BASE + "    recovery: {hold: .inf}\n", 5, "finite"),
        (BASE + "    cooldown: {initial: .nan}\n", 5, "finite"),
        (BASE + "    sustain: {consecutive: 100000000}\n", 5, "from 1 to 10000"),
        (
            BASE + "    levels: [{level: L1, actions: [{type: event, retries: 1000000}]}]\n",
            5,
            "retries",
        ),
        ("mode: monitor\nmode: enforce\n", 2, "appears twice"),
        (BASE + "    signal: {kind: orphans}\n", 5, "first on line 4"),
    ],
)
def test_non_finite_and_duplicate_values_are_refused_with_their_line(
    text: str, line: int, reason: str
) -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy(text)
    assert info.value.line == line and reason in info.value.reason


@pytest.mark.parametrize("duration", [math.nan, math.inf, -1.0, 1e12])
def test_override_durations_must_be_finite_and_bounded(duration: float) -> None:
    with pytest.raises(InvalidArgument, match="duration_seconds"):
        check_override("g", "L1", "", duration)
    check_override("g", "L1", "", 3600.0)


# --- actions --------------------------------------------------------------------------------


def ctx(service: str, **kw: Any) -> ActionContext:
    return ActionContext(1, DEGRADE, service, "r", "L1", "", "L1", "test", "enforce", T0, T0, **kw)


def test_a_file_path_is_checked_after_substitution(tmp_path: Path) -> None:
    act = build_action({"type": "file", "path": f"{tmp_path}/{{service}}/flag"})
    assert isinstance(act, FileAction)
    assert act.describe(ctx("shop/checkout")) == f"{tmp_path}/shop_checkout/flag"
    seen: list[Attempt] = []
    for bad in ("..", "a\nb", "x\x00y", "."):
        assert not run_action(act, ctx(bad), lambda a, _c: seen.append(a), sleep=lambda s: None)
        assert seen[-1].outcome == "failed" and "file name" in seen[-1].error
    assert not (tmp_path / "flag").exists()
    for path in ("/run/../etc/x", "/tmp/a\x00b", "/tmp/a\nb"):
        with pytest.raises(ActionSpecError, match="path"):
            build_action({"type": "file", "path": path})


def test_an_exception_in_an_action_is_a_failed_attempt_not_a_crash() -> None:
    class Broken(Action):
        type = "broken"

        def apply(self, c: ActionContext) -> str:
            raise ValueError("embedded null byte")

    seen: list[Attempt] = []
    assert not run_action(Broken({}), ctx("shop"), lambda a, _c: seen.append(a))
    assert seen[0].outcome == "failed" and "embedded null byte" in seen[0].error


def test_agents_can_narrow_but_never_widen_a_kubernetes_target() -> None:
    with pytest.raises(ActionSpecError, match="namespaces"):
        build_action({"type": "kubernetes"})
    act = build_action({"type": "kubernetes", "namespaces": ["shop"]})
    assert isinstance(act, KubernetesAction)
    seen = {"namespace": "shop", "workload_kind": "StatefulSet", "workload_name": "db"}
    assert act.target(ctx("shop/db", kubernetes=seen)) == ("StatefulSet", "shop", "db")
    assert act.target(ctx("shop/checkout")) == ("Deployment", "shop", "checkout")
    widen = {"namespace": "kube-system", "workload_kind": "DaemonSet", "workload_name": "x"}
    for c in (ctx("kube-system/coredns"), ctx("shop/checkout", kubernetes=widen)):
        with pytest.raises(Exception, match="may not touch"):
            act.target(c)
    pinned = build_action({"type": "kubernetes", "namespace": "shop", "name": "checkout"})
    # the agents' placement in another namespace cannot move a pinned action
    assert pinned.target(ctx("shop/checkout", kubernetes=widen)) == (
        "Deployment",
        "shop",
        "checkout",
    )


# --- the action pool ----------------------------------------------------------------------


def test_actions_of_300_services_run_on_a_bounded_pool_in_order_per_service() -> None:
    runner = ThreadRunner(workers=4)
    done: list[tuple[str, int]] = []
    lock = threading.Lock()

    class Record(Action):
        type = "record"

        def apply(self, c: ActionContext) -> str:
            time.sleep(0.001)
            with lock:
                done.append((c.service, c.decision_id))
            return "ok"

    before = threading.active_count()
    for n in range(3):
        for i in range(300):
            c = replace(ctx(f"svc-{i}"), decision_id=n)
            runner.submit(Record({}), c, lambda a, _c: None)
    assert threading.active_count() - before <= 4
    assert runner.wait_idle(30)
    runner.close()
    assert len(done) == 900
    for i in range(300):
        assert [d for s, d in done if s == f"svc-{i}"] == [0, 1, 2]


# --- the event log's ceiling ----------------------------------------------------------------


def test_events_are_kept_by_age_and_by_size(tmp_path: Path) -> None:
    now = [T0]
    log = EventLog(
        open_db(str(tmp_path / "e.db")), lambda: now[0], max_age_seconds=100, max_bytes=400_000
    )
    for i in range(50):
        log.append(1, f"old {i}")
    now[0] += 200
    log.append(1, "new")
    assert log.prune() == 50
    assert [e.message for e in log.query()] == ["new"]
    for i in range(3000):
        log.append(1, "x" * 1000, details={"i": i})
    log.prune()
    assert log.used_bytes() <= 400_000
    kept = log.query(limit=10_000)
    assert kept and kept[-1].details == {"i": 2999}  # the newest stay


def test_oversized_and_non_finite_event_fields_are_bounded(tmp_path: Path) -> None:
    log = EventLog(open_db(str(tmp_path / "e.db")))
    e = log.append(1, "m" * 100_000, details={"v": math.nan, "blob": "b" * 100_000})
    (stored,) = log.query()
    assert len(stored.message) <= 4096 and stored.details.get("truncated")
    log.append(1, "nan", details={"v": math.inf})
    assert log.query(after_id=e.id)[0].details == {"v": None}


# --- names in reports and terminals ---------------------------------------------------------


EVIL = "main.evil\x1b[2J\x00\x07\n"


def test_flame_graphs_of_hostile_names_and_deep_stacks_are_valid_xml() -> None:
    stacks = {tuple([EVIL] + [f"f{i}\x01" for i in range(5000)]): 3, ("a", "b"): 1}
    svg = flamegraph.render_svg(stacks, f"title {EVIL}")
    ET.fromstring(svg)  # raises on invalid XML
    assert "\\x1b" in svg and "\x1b" not in svg
    line = flamegraph.folded_line([EVIL, "x"], 3)
    assert "\n" not in line and "\x00" not in line


def test_terminal_output_escapes_control_characters() -> None:
    assert views.printable(EVIL) == "main.evil\\x1b[2J\\x00\\x07\\x0a"
    text = views.table([(EVIL, 1)], ("NAME", "N"))
    assert "\x1b" not in text and text.count("\n") == 2


# --- one service's failure holds only itself ------------------------------------------------


def test_a_failure_gathering_one_services_evidence_holds_no_other_decision(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from engineworld import World

    w = World()
    w.policy(
        """
        mode: monitor
        rules:
          - name: g
            signal: {kind: goroutines, above: 100}
        """
    )
    real = w.engine.evidence

    def poisoned(rule: Any, svc: str, *a: Any, **kw: Any) -> dict[str, Any]:
        if svc == "poison":
            raise OverflowError("int too large to convert to float")
        return real(rule, svc, *a, **kw)

    w.engine.evidence = poisoned  # type: ignore[method-assign]
    with caplog.at_level("ERROR"):
        w.step({"poison": 500, "calm": 500})
    # both decided; the poisoned one says why its evidence is missing
    decided = {d["service"]: d for d in w.decisions()}
    assert set(decided) == {"calm", "poison"}
    assert "OverflowError" in decided["poison"]["evidence"]["error"]
    assert "error" not in decided["calm"]["evidence"]
    assert any("poison" in r.getMessage() for r in caplog.records)


def test_plain_service_names_and_long_text_are_cut_but_kubernetes_names_are_checked() -> None:
    store = Store(quiet)
    a = SimAgent("a1")
    odd = process_info(1, "evil\x1b[31m" + "n" * 300, reason="r" * 5000)
    store.ingest(a.batch(appeared=[odd, process_info(2, "fine")]), T0)
    p = store.procs[("a1", 1)]
    assert p.service.startswith("evil?[31m") and len(p.service) == 253
    assert len(p.info.tracking_reason) == 1024 and ("a1", 2) in store.procs
    assert store.agents["a1"].drops["strings_over_length"] == 2
    with pytest.raises(InvalidArgument, match="Kubernetes"):
        store.ingest(a.batch(appeared=[process_info(3, "Shop/x")]), T0)
