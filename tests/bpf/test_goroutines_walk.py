"""The agent's interval over many processes reads the shared goroutine tables once:
one walk of the counts serves every process's reading, birth records are looked up
by goid, and records of dead goroutines cost user space nothing (births take their
slots). Real probes on real Go programs; the walks are counted, not timed.
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


def test_one_walk_serves_every_process(
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
            start = {tr: {g.goid for g in tr.snapshot().goroutines} for tr in trackers}
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
                    # Its goroutines born while traced have their birth records.
                    new = {g.goid for g in snap.goroutines} - start[tr]
                    assert len(new) == 2 and new <= set(tr.births.born)
    finally:
        for tr in trackers:
            tr.close()
        program.close()


def test_a_slot_taken_since_it_was_judged_is_not_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the exit probe on, reconcile() frees the slots one pass over the array
    judged stale; a slot another process took between that pass and the free (the
    same goid, another pid) keeps its record."""
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
                # Slots are freed one by one only with the exit probe on (its mode).
                program.set_exits(pop.pid, True)
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
    CPU follows what is live, not the birth rate. Counts stay exact, and every
    goroutine born while traced keeps its birth record."""
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
            assert program.hash_entries(b.pid) > 0, "the hash was used"
    finally:
        program.close()


def test_records_another_tracker_has_read_give_way_to_births() -> None:
    """Nothing frees the slot of a dead goroutine without the exit probe: a birth
    takes a slot holding a record of its own process, or one another process's
    tracker has read (it keeps what it read of live goroutines). So one busy
    process's dead records keep another's births out of the slots (into the hash)
    only until its tracker's next reading."""
    program = GoroutineProgram(max_live=64, max_sites=1024)
    try:
        with tracked_pair(program, gobuild.TOOLCHAINS[-1], **COUNTS) as ((a, ta), (b, tb)):
            start = {tr: {g.goid for g in tr.snapshot().goroutines} for tr in (ta, tb)}
            a.command("orphans 10")
            ta.snapshot()  # reads their records: A keeps them while they live
            a.churn(2000)  # its dead goroutines' records now fill every slot
            b.command("orphans 5")
            # 5 orphans and the goroutine that started them
            assert program.hash_entries(b.pid) == 6, "records not read yet are not taken"
            ta.snapshot()
            b.command("orphans 20")
            assert program.hash_entries(b.pid) == 6, "read records give way to births"
            new_b = {g.goid for g in tb.snapshot().goroutines} - start[tb]
            assert len(new_b) == 25 and new_b <= set(tb.births.born)
            # A's live goroutines whose slots were taken keep the records A read.
            snap_a = ta.snapshot()
            new_a = {g.goid for g in snap_a.goroutines} - start[ta]
            assert len(new_a) == 10 and new_a <= set(ta.births.born)
            assert site(snap_a.sites, "churn").created == 2000
    finally:
        program.close()
