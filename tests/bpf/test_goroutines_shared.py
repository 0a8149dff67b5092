"""One compiled goroutines program for several processes at once (the agent's way):
each process sees its own goroutines and counts, never another's; one leaves while
the others keep counting; a pid traced again starts from nothing; one busy process
cannot take the shared tables from the others.
"""

from __future__ import annotations

import pytest

import gobuild
from goleash.node.tracker import ProcessTracker, SiteSummary
from goleash.probes.goroutines import (
    GoroutineProgram,
    ProbeAttachError,
    load_count,
    node_program,
)
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import running_populations

pytestmark = pytest.mark.root

COUNTS = {"orphan": 3, "nilselect": 2, "condwait": 2, "worker": 1, "sleeper": 1}


def site(sites: list[SiteSummary], marker: str) -> SiteSummary:
    fname, line = gobuild.marker_line("populations", marker)
    found = [s for s in sites if s.go_statement.endswith(f"{fname}:{line}")]
    assert len(found) == 1, f"no single site for {marker} in {sites}"
    return found[0]


def churn_counted(tracker: ProcessTracker, created: int, exited: int):
    def check():
        snap = tracker.snapshot()
        c = site(snap.sites, "churn")
        return snap if (c.created, c.exited) == (created, exited) else None

    return wait_for(check, f"PID {tracker.proc.pid}: churn {created} born, {exited} exited")


def test_processes_of_different_toolchains_share_one_program() -> None:
    # The oldest toolchain has no g.parentGoid (parents from g0.m.curg) and another
    # runtime.g layout than the newest, built as PIE (a load bias).
    old, new = gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]
    loads = load_count()
    program = node_program()
    trackers: list[ProcessTracker] = []
    try:
        with (
            running_populations(old, "default", **COUNTS) as a,
            running_populations(new, "pie", **COUNTS) as b,
        ):
            # One with the exit probe (--lifetimes), one without: a mode per process.
            ta = ProcessTracker(
                GoProcess.attach(a.pid), program=program, orphan_min_age_s=0, lifetimes=True
            )
            trackers.append(ta)
            tb = ProcessTracker(GoProcess.attach(b.pid), program=program, orphan_min_age_s=0)
            trackers.append(tb)
            ta.start()
            tb.start()
            assert ta.mode == tb.mode == "probes"
            assert program.pids == {a.pid, b.pid}

            a.churn(300)
            b.churn(700)
            late_a = a.command("orphans 2")
            late_b = b.command("orphans 5")
            snap_a = churn_counted(ta, 300, 300)
            snap_b = churn_counted(tb, 700, 700)
            for snap, tr, late, n in ((snap_a, ta, late_a, 2), (snap_b, tb, late_b, 5)):
                # Its own counts only: every hit it counted is at one of its sites.
                hits = snap.probe_hits
                assert hits["create_hits"] == sum(s.created for s in snap.sites)
                if tr is ta:
                    assert snap.lifetimes == "exact"
                    assert hits["exit_hits"] == sum(s.exited + s.exited_unseen for s in snap.sites)
                else:
                    assert (snap.lifetimes, hits["exit_hits"]) == ("off", 0)
                assert site(snap.sites, "orphan").created == n
                born = tr.probes.read().live
                if tr is ta:  # exits free their records: what is left is live
                    assert all(g.goid in {x.goid for x in snap.goroutines} for g in born.values())
                kids = [g for g in born.values() if g.parent_goid == late["creator_goid"]]
                assert len(kids) == n
                assert snap.dropped == dict.fromkeys(snap.dropped, 0)
            assert snap_a.go_version != snap_b.go_version

            # One leaves: its uprobes and its records go, the other keeps counting.
            ta.close()
            trackers.remove(ta)
            assert program.pids == {b.pid}
            b.churn(200)
            snap_b = churn_counted(tb, 900, 900)
            assert snap_b.probe_hits["create_hits"] == sum(s.created for s in snap_b.sites)
            assert site(snap_b.sites, "orphan").created == 5
            bpf = program.bpf
            assert bpf is not None
            assert not [k for k in bpf["site_stats"] if k.pid == a.pid]
            assert not [k for k in bpf["live_goroutines"] if k.pid == a.pid]

            # The same pid traced again (as after pid reuse) starts from nothing: the
            # per-CPU cache still holds its old births, under its old registration.
            ta = ProcessTracker(GoProcess.attach(a.pid), program=program)
            trackers.append(ta)
            ta.start()
            first = ta.snapshot()
            assert first.probe_hits["create_hits"] == 0
            assert [s for s in first.sites if s.created] == []
            a.churn(40)
            churn_counted(ta, 40, 40)
        assert load_count() - loads == 1, "one BPF program for every process"
    finally:
        for tr in trackers:
            tr.close()
        program.close()


@pytest.mark.parametrize("lifetimes", [False, True], ids=["births-only", "lifetimes"])
def test_a_busy_process_cannot_take_the_shared_table(lifetimes: bool) -> None:
    """Past its share of the shared live table a process counts its own drops (with
    the exit probe; without it, its births overwrite its own slots); the others
    still find room."""
    toolchain = gobuild.TOOLCHAINS[-1]
    # 256 direct-mapped slots and a 256-entry hash, at most 64 of it per process. One
    # pid slot: the second process's row is found through the pid hash.
    program = GoroutineProgram(max_live=256, max_sites=1024, max_live_per_process=64, pid_slots=1)
    trackers: list[ProcessTracker] = []
    try:
        with (
            running_populations(toolchain, "default", **COUNTS) as busy,
            running_populations(toolchain, "default", **COUNTS) as quiet,
        ):
            for pop in (busy, quiet):
                tr = ProcessTracker(GoProcess.attach(pop.pid), program=program, lifetimes=lifetimes)
                trackers.append(tr)
                tr.start()
            t_busy, t_quiet = trackers
            fam_busy = busy.command("family 1000")  # 1000 children parked, parent alive
            fam_quiet = quiet.command("family 50")

            def counted():
                r = t_quiet.probes.read()
                kids = [g for g in r.live.values() if g.parent_goid == fam_quiet["parent_goid"]]
                return r if len(kids) == 50 else None

            wait_for(counted, "the quiet process's 50 children recorded")
            r_busy = t_busy.probes.read()
            busy_kids = [
                g for g in r_busy.live.values() if g.parent_goid == fam_busy["parent_goid"]
            ]
            # At most every slot and its share of the hash; the rest are its drops
            # (without the exit probe, births it overwrote itself).
            assert len(busy_kids) <= 256 + 64
            if lifetimes:
                assert r_busy.counters["live_table_full"] >= 1000 - len(busy_kids)
            else:
                assert r_busy.counters["live_table_full"] <= 1000 - len(busy_kids)
            assert t_quiet.probes.read().counters["live_table_full"] == 0
    finally:
        for tr in trackers:
            tr.close()
        program.close()


def test_creator_stacks_shared_and_forgotten() -> None:
    """--stacks with one program: two processes of one executable record the same
    creator stack (one stack id); the first to leave keeps it for the other, the
    last one takes it away."""
    toolchain = gobuild.TOOLCHAINS[-1]
    program = node_program(stacks=True)
    trackers: list[ProcessTracker] = []
    try:
        with (
            running_populations(toolchain, "default", **COUNTS) as a,
            running_populations(toolchain, "default", **COUNTS) as b,
        ):
            for pop in (a, b):
                tr = ProcessTracker(GoProcess.attach(pop.pid), program=program)
                trackers.append(tr)
                tr.start()
                pop.command("orphans 3")
            ids: list[set[int]] = []
            for tr in trackers:
                snap = tr.snapshot()
                assert site(snap.sites, "orphan").creator_stack[0].startswith("main.creator ")
                ids.append({g.stack_id for g in tr.probes.read().live.values() if g.stack_id >= 0})
            shared = ids[0] & ids[1]
            assert shared, "one executable, one code path: one stack id"
            bpf = program.bpf
            assert bpf is not None
            trackers.pop(0).close()
            snap = trackers[0].snapshot()
            assert site(snap.sites, "orphan").creator_stack, "the other's stack is kept"
            trackers.pop(0).close()
            left = {k.value for k in bpf["creator_stacks"]}
            assert not (ids[0] | ids[1]) & left
    finally:
        for tr in trackers:
            tr.close()
        program.close()


def test_a_failed_compile_is_not_repeated_for_every_process() -> None:
    """Where the program cannot be built (say, no kernel headers), every process of
    the node gets the same error at once, not a compile attempt each."""
    program = GoroutineProgram(max_live=256, max_sites=1024)
    program.cflags = lambda: ["-DMAX_PROCS=not_a_number"]  # type: ignore[method-assign]
    loads = load_count()
    with pytest.raises(ProbeAttachError, match="compiling goroutines.bpf.c failed") as first:
        program.compile()
    program.cflags = lambda: []  # type: ignore[method-assign]  # would not even find goleash.h
    with pytest.raises(ProbeAttachError) as again:
        program.compile()
    assert again.value is first.value
    assert load_count() == loads and not program.compiled
