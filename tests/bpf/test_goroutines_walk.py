"""The agent's interval over many processes reads the shared goroutine tables once:
one walk serves every process's reading and the freeing of its dead birth records
(reconcile), instead of a copy of the whole slot array per process. Real probes on
real Go programs; the walks are counted, not timed.
"""

from __future__ import annotations

import ctypes

import pytest

import gobuild
from goleash.node.tracker import ProcessTracker, SiteSummary
from goleash.probes import goroutine_program
from goleash.probes.goroutine_records import SLOT_HEAD
from goleash.probes.goroutines import GoroutineProgram
from goleash.probes.inventory import read_goroutines
from goleash.probes.target import GoProcess
from populations import running_populations, tracked_pair

pytestmark = pytest.mark.root

COUNTS = {"orphan": 2, "sleeper": 1}


def site(sites: list[SiteSummary], marker: str) -> SiteSummary:
    fname, line = gobuild.marker_line("populations", marker)
    found = [s for s in sites if s.go_statement.endswith(f"{fname}:{line}")]
    assert len(found) == 1, f"no single site for {marker} in {sites}"
    return found[0]


def test_one_walk_serves_every_process_and_frees_their_dead_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow machine must not turn one walk into several (a walk is reused for 1 s).
    monkeypatch.setattr(goroutine_program, "TABLES_MAX_AGE_S", 600.0)
    old, new = gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]
    program = GoroutineProgram(max_live=1024, max_sites=1024)
    walks = []
    walk_tables = program._walk_tables

    def counted(with_live: bool):  # type: ignore[no-untyped-def]
        walks.append(with_live)
        return walk_tables(with_live)

    monkeypatch.setattr(program, "_walk_tables", counted)
    trackers: list[ProcessTracker] = []
    try:
        with (
            running_populations(old, "default", **COUNTS) as a,
            running_populations(new, "pie", **COUNTS) as b,
            running_populations(new, "default", **COUNTS) as c,
        ):
            pops = {a.pid: (a, 200), b.pid: (b, 300), c.pid: (c, 400)}
            for pid in pops:
                tr = ProcessTracker(GoProcess.attach(pid), program=program)
                trackers.append(tr)
                tr.start()
            for pop, n in pops.values():
                pop.churn(n)  # n dead goroutines whose birth records stay in the kernel
                pop.command("orphans 2")  # and two born while traced that stay
            for _interval in range(2):
                before = len(walks)
                snaps = [tr.snapshot() for tr in trackers]
                assert len(walks) - before == 1, "one walk of the tables per interval"
                for tr, snap in zip(trackers, snaps, strict=True):
                    n = pops[tr.proc.pid][1]
                    churn = site(snap.sites, "churn")
                    assert (churn.created, churn.exited, churn.live) == (n, n, 0)
                    # What the kernel still holds of it is its live goroutines only,
                    # though its part of the walk was read before its memory was.
                    live = {g.goid for g in snap.goroutines}
                    kernel = tr.probes.read().live
                    assert len(kernel) >= 2 and set(kernel) <= live
    finally:
        for tr in trackers:
            tr.close()
        program.close()


def test_a_slot_taken_since_it_was_judged_is_not_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """reconcile() frees the slots one pass over the array judged stale; a slot another
    process took between that pass and the free (the same goid, another pid) keeps
    its record."""
    program = GoroutineProgram(max_live=1024, max_sites=1024)
    size = goroutine_program._LIVE_SLOT.size
    judged: list[tuple[int, int]] = []
    real_stale_slots = goroutine_program.stale_slots

    def then_taken(mm, *args):  # type: ignore[no-untyped-def]
        found = real_stale_slots(mm, *args)
        judged.extend(found)
        idx, _goid = found[0]
        # Another process's birth of the same goid lands in that slot now.
        slot_pid = ctypes.c_uint32.from_buffer(mm, idx * size + 8)
        slot_pid.value += 1
        del slot_pid
        return found

    try:
        with running_populations(gobuild.TOOLCHAINS[-1], "default", **COUNTS) as pop:
            tracker = ProcessTracker(GoProcess.attach(pop.pid), program=program)
            try:
                tracker.start()
                pop.churn(100)
                inv = read_goroutines(tracker.proc)
                live = frozenset(g.goid for g in inv.goroutines)
                monkeypatch.setattr(goroutine_program, "stale_slots", then_taken)
                freed = program.reconcile(pop.pid, live, inv.read_ns)
                monkeypatch.undo()
                assert len(judged) > 1
                idx, goid = judged[0]
                mm = program._writable_slots()
                head = SLOT_HEAD.unpack_from(mm, idx * size)
                assert head[:2] == (goid, pop.pid + 1), "another process's record was freed"
                assert freed == len(judged) - 1
                remaining = program.reading(pop.pid).live
                assert set(remaining) <= live
                ctypes.c_uint64.from_buffer(mm, idx * size).value = 0  # free it again
            finally:
                tracker.close()
    finally:
        program.close()


def test_births_after_the_walk_are_counted_with_the_memory_that_shows_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A walk made for one process serves the next only while the next had no hit
    since: goroutines born in between are live in its memory, so its counts must
    have them too (exits are derived from births and live counts)."""
    monkeypatch.setattr(goroutine_program, "TABLES_MAX_AGE_S", 600.0)
    toolchain = gobuild.TOOLCHAINS[-1]
    program = GoroutineProgram(max_live=1024, max_sites=1024)
    try:
        with tracked_pair(program, toolchain, **COUNTS) as ((a, ta), (b, tb)):
            for _interval in range(2):
                ta.snapshot()  # the walk, before b's births
                b.command("orphans 3")
                b.churn(50)
                snap = tb.snapshot()
                late, churn = site(snap.sites, "orphan"), site(snap.sites, "churn")
                assert (late.created, churn.created) == (3 * (_interval + 1), 50 * (_interval + 1))
                assert (late.exited, churn.exited, churn.live) == (0, 50 * (_interval + 1), 0)
    finally:
        program.close()


def test_an_interval_never_copies_the_records_of_dead_goroutines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy service leaves ~100k records of goroutines born and dead within each
    interval. A tracker's interval looks up its new live goroutines' records by goid
    (in their slot, else in the hash) and never copies the slot array: the agent's
    CPU follows what is live, not the birth rate. Counts stay exact, every goroutine
    born while traced keeps its birth record, and only live records are left."""
    copies: list[int] = []
    real_occupied = goroutine_program.occupied_slots

    def counted(*args):  # type: ignore[no-untyped-def]
        copies.append(1)
        return real_occupied(*args)

    # 64 slots, and as many hash entries: the first process's churn takes every slot,
    # so the second's births land in the hash (a few: it must hold them all).
    program = GoroutineProgram(max_live=64, max_sites=1024)
    try:
        with tracked_pair(program, gobuild.TOOLCHAINS[-1], **COUNTS) as ((a, ta), (b, tb)):
            before = {tr: {g.goid for g in tr.snapshot().goroutines} for tr in (ta, tb)}
            monkeypatch.setattr(goroutine_program, "occupied_slots", counted)
            churns = {ta: 500, tb: 10}
            for interval in range(1, 3):
                for pop, tr in ((a, ta), (b, tb)):
                    pop.churn(churns[tr])
                    pop.command("orphans 20")  # born while traced, and they stay
                for tr in (ta, tb):
                    snap = tr.snapshot()
                    churn = site(snap.sites, "churn")
                    n = churns[tr] * interval
                    assert (churn.created, churn.exited, churn.live) == (n, n, 0)
                    new = {g.goid for g in snap.goroutines} - before[tr]
                    assert len(new) == 20 * interval
                    assert new <= set(tr.births.born), "a traced birth lost its record"
            assert copies == [], "an interval copied the whole slot array"
            assert tb.probes is not None and program._in_hash(b.pid) > 0, "the hash was used"
            monkeypatch.undo()
            for tr in (ta, tb):
                assert tr.probes is not None
                live = {g.goid for g in tr.snapshot().goroutines}
                assert set(tr.probes.read().live) <= live, "dead records were left"
    finally:
        program.close()
