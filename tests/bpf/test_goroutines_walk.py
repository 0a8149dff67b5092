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


def test_a_slot_taken_since_the_walk_is_not_freed() -> None:
    """reconcile() frees from the walk's view of the slots; a slot another process
    took since then (the same goid, another pid) keeps its record."""
    program = GoroutineProgram(max_live=1024, max_sites=1024)
    size = goroutine_program._LIVE_SLOT.size
    try:
        with running_populations(gobuild.TOOLCHAINS[-1], "default", **COUNTS) as pop:
            tracker = ProcessTracker(GoProcess.attach(pop.pid), program=program)
            try:
                tracker.start()
                pop.churn(100)
                inv = read_goroutines(tracker.proc)
                live = frozenset(g.goid for g in inv.goroutines)
                program.reading(pop.pid)  # the walk reconcile frees from
                walk = program._walk
                assert walk is not None
                dead = [s for s in walk.slots[pop.pid] if s[1] not in live]
                assert len(dead) > 1
                idx, goid, _ns = dead[0]
                # Another process's birth of the same goid lands in that slot now.
                mm = program._writable_slots()
                slot_pid = ctypes.c_uint32.from_buffer(mm, idx * size + 8)
                slot_pid.value = pop.pid + 1
                del slot_pid
                freed = program.reconcile(pop.pid, live, inv.read_ns)
                head = SLOT_HEAD.unpack_from(mm, idx * size)
                assert head[:2] == (goid, pop.pid + 1), "another process's record was freed"
                assert freed == len(dead) - 1
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
