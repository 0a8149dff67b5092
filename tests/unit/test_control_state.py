"""The control plane's Store on plain data: ingest rules, aggregation, queries, errors."""

from __future__ import annotations

from typing import Any

import pytest

from agentsim import SimAgent, goroutine, process_info, site, snapshot
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import answers
from goleash.control.histogram import bucket_bounds, bucket_index
from goleash.control.state import InvalidArgument, NotFound, Store

T0 = 1_000_000.0
LEAK = ("main.handle.func1", "/src/shop/main.go:42")
POOL = ("main.worker", "/src/shop/pool.go:17")


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    def __call__(self, kind: int, message: str, **kw: Any) -> None:
        self.events.append((kind, message, kw))

    def kinds(self) -> list[int]:
        return [k for k, _, _ in self.events]


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def store(log: Log) -> Store:
    return Store(log)


def test_duplicates_are_ignored_and_gaps_counted(store: Store, log: Log) -> None:
    a = SimAgent("a1")
    b1, b2 = a.batch(), a.batch()
    assert store.ingest(b1, T0) and store.ingest(b2, T0 + 5)
    assert not store.ingest(b2, T0 + 6)  # resent after a reconnect
    assert store.ingest(a.batch(sequence=5), T0 + 20)
    ag = store.agents["a1"]
    assert (ag.batches, ag.duplicates, ag.gaps, ag.last_sequence) == (3, 1, 2, 5)
    assert log.kinds().count(t.EVENT_KIND_AGENT_SEQUENCE_GAP) == 1


def test_a_restarted_agent_starts_its_sequence_over(store: Store) -> None:
    a = SimAgent("a1")
    for _ in range(3):
        store.ingest(a.batch(), T0)
    a.restart()
    assert store.ingest(a.batch(), T0 + 1)
    assert store.agents["a1"].gaps == 0 and store.agents["a1"].duplicates == 0


def test_batches_without_identity_or_sequence_are_rejected(store: Store) -> None:
    a = SimAgent("")
    with pytest.raises(InvalidArgument, match="agent_id"):
        store.ingest(a.batch(), T0)
    with pytest.raises(InvalidArgument, match="sequence"):
        store.ingest(SimAgent("x").batch(sequence=0), T0)


def test_processes_aggregate_into_their_service(store: Store, log: Log) -> None:
    a, b = SimAgent("a"), SimAgent("b")
    store.ingest(a.batch(appeared=[process_info(10, "shop")]), T0)
    store.ingest(b.batch(appeared=[process_info(20, "shop"), process_info(21, "cart")]), T0)
    store.ingest(a.batch(snapshots=[snapshot(10, [site(*LEAK, live=30, created=30)])]), T0 + 5)
    store.ingest(
        b.batch(
            snapshots=[
                snapshot(20, [site(*LEAK, live=12, created=15, exited=3)]),
                snapshot(21, [site(*POOL, live=8, created=8)]),
            ]
        ),
        T0 + 5,
    )
    resp = answers.goroutine_summary(store, q.GetGoroutineSummaryRequest(), T0 + 6)
    assert (resp.processes, resp.goroutines, resp.created, resp.exited) == (3, 50, 53, 3)
    rows = {(s.service, s.function): s for s in resp.sites}
    assert rows[("shop", LEAK[0])].live == 42 and rows[("shop", LEAK[0])].processes == 2
    assert rows[("shop", LEAK[0])].created == 45 and rows[("shop", LEAK[0])].exited == 3
    assert rows[("cart", POOL[0])].live == 8
    # the same numbers through a process selector (per-process windows)
    one = answers.goroutine_summary(
        store,
        q.GetGoroutineSummaryRequest(selector=q.ProcessSelector(agent_id="b", pid=20)),
        T0 + 6,
    )
    assert [(s.function, s.live, s.created) for s in one.sites] == [(LEAK[0], 12, 15)]
    # the process goes: the service forgets its goroutines, the event log says so
    store.ingest(
        b.batch(gone=[(20, process_info(20, "shop").start_time_unix_nano, "exited")]), T0 + 10
    )
    resp = answers.goroutine_summary(store, q.GetGoroutineSummaryRequest(), T0 + 11)
    assert {(s.service, s.function): s.live for s in resp.sites}[("shop", LEAK[0])] == 30
    assert store.services["shop"].sites[LEAK].live == 30
    assert log.kinds().count(t.EVENT_KIND_PROCESS_APPEARED) == 3
    assert log.kinds().count(t.EVENT_KIND_PROCESS_GONE) == 1
    listed = answers.list_processes(store, q.ListProcessesRequest(include_gone=True), T0 + 11)
    assert {(p.info.pid, p.state) for p in listed.processes} == {
        (10, q.PROCESS_STATE_RUNNING),
        (20, q.PROCESS_STATE_GONE),
        (21, q.PROCESS_STATE_RUNNING),
    }


def test_a_site_missing_from_a_snapshot_has_no_live_goroutines_left(store: Store) -> None:
    a = SimAgent("a")
    store.ingest(a.batch(appeared=[process_info(10, "shop")]), T0)
    store.ingest(a.batch(snapshots=[snapshot(10, [site(*POOL, live=8, created=8)])]), T0 + 5)
    store.ingest(a.batch(snapshots=[snapshot(10, [])]), T0 + 10)
    assert store.services["shop"].sites[POOL].live == 0
    resp = answers.goroutine_summary(store, q.GetGoroutineSummaryRequest(), T0 + 11)
    assert [(s.live, s.created) for s in resp.sites] == [(0, 8)]  # still in the window


def test_reannounced_processes_are_not_news_and_pid_reuse_is(store: Store, log: Log) -> None:
    a = SimAgent("a")
    info = process_info(10, "shop", start=111)
    store.ingest(a.batch(appeared=[info]), T0)
    store.ingest(a.batch(appeared=[info]), T0 + 5)  # first batch of a new stream
    assert log.kinds().count(t.EVENT_KIND_PROCESS_APPEARED) == 1
    store.ingest(a.batch(appeared=[process_info(10, "shop", start=222)]), T0 + 10)
    assert log.kinds().count(t.EVENT_KIND_PROCESS_APPEARED) == 2
    assert log.kinds().count(t.EVENT_KIND_PROCESS_GONE) == 1
    # a control plane restarted with the log's open processes does not log them again
    fresh = Log()
    restarted = Store(fresh, known_processes={("a", 10, 222)})
    restarted.ingest(SimAgent("a").batch(appeared=[process_info(10, "shop", start=222)]), T0)
    assert t.EVENT_KIND_PROCESS_APPEARED not in fresh.kinds()


def test_snapshot_of_an_unannounced_process_is_counted_not_applied(store: Store) -> None:
    a = SimAgent("a")
    store.ingest(a.batch(snapshots=[snapshot(99, [site(*POOL, live=3)])]), T0)
    assert not store.procs
    assert store.agents["a"].drops["snapshot_of_unannounced_process"] == 1


def test_tracking_mode_changes_are_logged(store: Store, log: Log) -> None:
    a = SimAgent("a")
    store.ingest(a.batch(appeared=[process_info(10, "shop")]), T0)
    degraded = process_info(10, "shop", mode=t.TRACKING_MODE_INVENTORY_ONLY, reason="budget")
    store.ingest(a.batch(appeared=[degraded]), T0 + 5)
    assert log.kinds().count(t.EVENT_KIND_PROCESS_TRACKING_CHANGED) == 1


def orphan_setup(store: Store) -> None:
    a, b = SimAgent("a"), SimAgent("b")
    store.ingest(a.batch(appeared=[process_info(10, "shop")]), T0)
    store.ingest(b.batch(appeared=[process_info(20, "shop")]), T0)
    kept_a = [
        goroutine(100, *LEAK, age=90, blocked=89, orphan=True, reason="chan receive"),
        goroutine(101, *LEAK, age=30, blocked=29, orphan=True, reason="chan receive"),
        goroutine(5, *POOL, age=500, reason="select"),
    ]
    store.ingest(
        a.batch(
            snapshots=[
                snapshot(
                    10,
                    [
                        site(
                            *LEAK,
                            live=40,
                            created=40,
                            oldest=90,
                            orphans=25,
                            orphan_oldest=90,
                            orphan_reason="chan receive",
                        ),
                        site(*POOL, live=8, created=8, oldest=500, waits={"select": 8}),
                    ],
                    kept=kept_a,
                )
            ]
        ),
        T0 + 5,
    )
    store.ingest(
        b.batch(
            snapshots=[
                snapshot(
                    20,
                    [
                        site(
                            *LEAK,
                            live=10,
                            created=10,
                            oldest=200,
                            orphans=4,
                            orphan_oldest=200,
                            orphan_reason="select",
                        )
                    ],
                    kept=[goroutine(7, *LEAK, age=200, blocked=199, orphan=True, reason="select")],
                )
            ]
        ),
        T0 + 5,
    )


def test_orphans_are_grouped_by_service_and_site(store: Store, log: Log) -> None:
    orphan_setup(store)
    (g,) = answers.list_orphans(store, q.ListOrphansRequest(), T0 + 6).groups
    assert (g.service, g.function, g.go_statement) == ("shop", *LEAK)
    assert g.count == 29 and g.oldest_age_seconds == 200 and g.processes == 2
    assert g.reason == "chan receive"  # 25 of the 29
    assert g.example.goroutine.goid == 7 and g.example.pid == 20  # the oldest kept one
    assert log.kinds().count(t.EVENT_KIND_ORPHANS_APPEARED) == 2
    assert not answers.list_orphans(store, q.ListOrphansRequest(min_age_seconds=201), T0 + 6).groups
    only_a = q.ListOrphansRequest(selector=q.ProcessSelector(agent_id="a"))
    assert answers.list_orphans(store, only_a, T0 + 6).groups[0].count == 25


def test_list_goroutines_filters_and_pages(store: Store) -> None:
    orphan_setup(store)
    everything = answers.list_goroutines(store, q.ListGoroutinesRequest(), T0 + 6)
    assert [r.goroutine.goid for r in everything.goroutines] == [5, 7, 100, 101]  # oldest first
    orphans = answers.list_goroutines(store, q.ListGoroutinesRequest(orphans_only=True), T0 + 6)
    assert [r.goroutine.goid for r in orphans.goroutines] == [7, 100, 101]
    by_stmt = q.ListGoroutinesRequest(site="main.go:42", min_age_seconds=60)
    assert [
        r.goroutine.goid for r in answers.list_goroutines(store, by_stmt, T0 + 6).goroutines
    ] == [7, 100]
    blocked = q.ListGoroutinesRequest(min_blocked_for_seconds=100)
    assert [
        r.goroutine.goid for r in answers.list_goroutines(store, blocked, T0 + 6).goroutines
    ] == [7]
    seen, token = [], ""
    while True:
        page = answers.list_goroutines(
            store, q.ListGoroutinesRequest(page_size=3, page_token=token), T0 + 6
        )
        assert page.total_size == 4
        seen += [r.goroutine.goid for r in page.goroutines]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 7, 100, 101]


@pytest.mark.parametrize(
    "req",
    [
        q.ListGoroutinesRequest(min_age_seconds=-1),
        q.ListGoroutinesRequest(min_blocked_for_seconds=float("nan")),
        q.ListGoroutinesRequest(state=99),
        q.ListGoroutinesRequest(page_size=-5),
        q.ListGoroutinesRequest(page_token="not-a-token"),
    ],
)
def test_malformed_goroutine_filters_are_invalid_arguments(
    store: Store, req: q.ListGoroutinesRequest
) -> None:
    with pytest.raises(InvalidArgument):
        answers.list_goroutines(store, req, T0)


def test_unknown_names_are_not_found(store: Store) -> None:
    orphan_setup(store)
    for sel in (
        q.ProcessSelector(service="nope"),
        q.ProcessSelector(agent_id="zz"),
        q.ProcessSelector(pid=4242),
    ):
        with pytest.raises(NotFound):
            answers.list_processes(store, q.ListProcessesRequest(selector=sel), T0)
    with pytest.raises(NotFound, match="no latency data"):
        answers.function_latency(store, q.GetFunctionLatencyRequest(function="main.nope"), T0)
    with pytest.raises(InvalidArgument, match="retention"):
        answers.list_processes(store, q.ListProcessesRequest(window_seconds=3600), T0)


def test_function_latency_quantiles_over_a_window(store: Store) -> None:
    a = SimAgent("a")
    store.ingest(a.batch(appeared=[process_info(10, "api")]), T0)
    fast = [1_000_000 + 1000 * i for i in range(990)]  # ~1 ms
    slow = [400_000_000] * 10  # 400 ms: the top 1 %
    store.ingest(a.batch(snapshots=[snapshot(10, latency={"main.call": fast + slow})]), T0 + 5)
    req = q.GetFunctionLatencyRequest(function="main.call", quantiles=[0.5, 0.995])
    resp = answers.function_latency(store, req, T0 + 6)
    assert resp.count == 1000 and resp.processes == 1
    p50, p995 = (x.value_seconds for x in resp.quantiles)
    lo, hi = bucket_bounds(bucket_index(sorted(fast)[499], 3), 3)
    assert lo * 1e-9 <= p50 <= hi * 1e-9
    lo, hi = bucket_bounds(bucket_index(400_000_000, 3), 3)
    assert lo * 1e-9 <= p995 <= hi * 1e-9
    assert abs(resp.mean_seconds - sum(fast + slow) / 1000 * 1e-9) < 1e-12
    # six minutes later, a 60 s window has none of it (and the 5 min one neither)
    store.ingest(a.batch(snapshots=[snapshot(10, latency={"main.call": [2_000_000]})]), T0 + 365)
    assert answers.function_latency(store, req, T0 + 366).count == 1
    with pytest.raises(InvalidArgument):
        answers.function_latency(
            store, q.GetFunctionLatencyRequest(function="main.call", quantiles=[1.5]), T0
        )


def test_a_growing_site_becomes_a_leak_suspect_and_clears(store: Store, log: Log) -> None:
    a = SimAgent("a")
    store.ingest(a.batch(appeared=[process_info(10, "shop")]), T0)
    now = T0
    for i in range(16):  # 80 s: the leak adds 15 goroutines per interval, a pool stays
        now = T0 + 5 * (i + 1)
        sites = [
            site(*LEAK, live=15 * (i + 1), created=15, oldest=5.0 * (i + 1)),
            site(*POOL, live=8, oldest=1000 + 5.0 * i),
        ]
        store.ingest(a.batch(snapshots=[snapshot(10, sites)]), now)
    store.detect(now)
    (s,) = answers.leak_suspects(store, q.ListLeakSuspectsRequest(), now).suspects
    assert (s.service, s.function, s.go_statement) == ("shop", *LEAK)
    assert 150 <= s.growth_per_minute <= 200  # 15 per 5 s = 180/min, slot-quantised
    assert log.kinds().count(t.EVENT_KIND_LEAK_SUSPECTED) == 1
    per_process = q.ListLeakSuspectsRequest(selector=q.ProcessSelector(agent_id="a", pid=10))
    assert [x.function for x in answers.leak_suspects(store, per_process, now).suspects] == [
        LEAK[0]
    ]
    for _ in range(16):  # the leak stops: goroutines end, the count falls back
        now += 5
        sites = [site(*LEAK, live=2, exited=20, oldest=1.0), site(*POOL, live=8, oldest=2000)]
        store.ingest(a.batch(snapshots=[snapshot(10, sites)]), now)
    store.detect(now)
    assert not answers.leak_suspects(store, q.ListLeakSuspectsRequest(), now).suspects
    assert log.kinds().count(t.EVENT_KIND_LEAK_CLEARED) == 1


def test_gone_processes_and_idle_services_are_pruned_after_the_retention(store: Store) -> None:
    a = SimAgent("a")
    info = process_info(10, "batch-job")
    store.ingest(a.batch(appeared=[info]), T0)
    store.ingest(a.batch(snapshots=[snapshot(10, [site(*POOL, live=3, created=3)])]), T0 + 5)
    store.ingest(a.batch(gone=[(10, info.start_time_unix_nano, "exited")]), T0 + 10)
    store.prune(T0 + 60)
    assert (a.identity.agent_id, 10) in store.procs  # still listed as gone
    store.prune(T0 + 400)
    assert not store.procs and "batch-job" not in store.services


def test_processes_ordered_by_goroutines_or_orphans_with_a_limit(store: Store) -> None:
    orphan_setup(store)
    busiest = answers.list_processes(
        store, q.ListProcessesRequest(order_by=q.PROCESS_ORDER_GOROUTINES, limit=1), T0 + 6
    )
    assert [p.info.pid for p in busiest.processes] == [10] and busiest.total_size == 2
    by_orphans = answers.list_processes(
        store, q.ListProcessesRequest(order_by=q.PROCESS_ORDER_ORPHANS), T0
    )
    assert [(p.info.pid, p.orphans) for p in by_orphans.processes] == [(10, 25), (20, 4)]
    with pytest.raises(InvalidArgument):
        answers.list_processes(store, q.ListProcessesRequest(order_by=7), T0)
