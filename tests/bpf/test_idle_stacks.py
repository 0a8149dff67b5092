"""An idle process is not walked again every interval, but a change is seen.

The exporter keeps the stacks it sent last time (probes/stacks.py walk_stacks memo):
a parked goroutine whose saved registers and stack bytes are unchanged gets the same
frames without a walk; a new goroutine, or one whose registers moved, is walked."""

from __future__ import annotations

import dataclasses

import pytest

import gobuild
from goleash.node.export import SnapshotExporter
from goleash.node.tracker import ProcessTracker
from goleash.probes.inventory import Goroutine, read_goroutines
from goleash.probes.stacks import Stack, StackKey, walk_stacks
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import running_populations

pytestmark = pytest.mark.root


def test_parked_goroutines_are_walked_once_and_changes_are_seen() -> None:
    with (
        running_populations(gobuild.TOOLCHAINS[-1], orphan=5, nilselect=3) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        parked = [g for g in read_goroutines(proc).goroutines if g.status == "waiting"]
        assert len(parked) >= 8
        memo: dict[StackKey, Stack] = {}
        first = walk_stacks(proc, parked, 32, memo=memo)
        assert len(memo) == len(parked)

        # The next interval: read again, nothing ran. Same frames, no walk.
        again = [g for g in read_goroutines(proc).goroutines if g.status == "waiting"]
        second = walk_stacks(proc, again, 32, memo=memo)
        fresh = walk_stacks(proc, again, 32)
        for g in again:
            if g.goid in first:
                assert second[g.goid] is first[g.goid], f"goroutine {g.goid} walked again"
            assert second[g.goid].frames == fresh[g.goid].frames
        assert any(f.function == "main.orphan" for st in second.values() for f in st.frames)

        # New goroutines (a late creator's orphans) are walked, the old still are not.
        assert pop.command("orphans 2")["orphaned"] == 2

        def parked_now() -> list[Goroutine] | None:
            gs = [g for g in read_goroutines(proc).goroutines if g.status == "waiting"]
            return gs if len(gs) >= len(parked) + 2 else None

        now = wait_for(parked_now, "the late orphans parked")
        third = walk_stacks(proc, now, 32, memo=memo)
        new = [g for g in now if g.goid not in first]
        assert len(new) >= 2
        assert all(third[g.goid].frames for g in new)
        assert all(third[g.goid] is first[g.goid] for g in now if g.goid in first)

        # A goroutine whose saved registers differ is walked afresh.
        g = now[0]
        moved = dataclasses.replace(g, sched_bp=0)
        fourth = walk_stacks(proc, [moved], 32, memo=memo)
        assert fourth[g.goid] is not third[g.goid]
        assert len(memo) <= 1  # only what the last call saw is kept


def test_exporter_sends_the_same_goroutines_as_a_fresh_one_every_interval() -> None:
    # The exporter reuses what did not change (walks, messages): what it sends must
    # equal what an exporter without that memory sends, interval after interval.
    with (
        running_populations(gobuild.TOOLCHAINS[-1], orphan=4, condwait=2) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        tracker = ProcessTracker(proc, use_probes=False, orphan_min_age_s=0.0)
        tracker.start()
        try:
            kept = SnapshotExporter(proc)
            sent = []  # messages already handed on stay as they were sent
            for step in range(3):
                if step == 2:
                    assert pop.command("orphans 1")["orphaned"] == 1
                snap = tracker.snapshot()
                message = kept.message(snap)
                mine = message.goroutines_kept
                fresh = SnapshotExporter(proc).message(snap).goroutines_kept
                assert len(mine) >= 6
                assert [m.SerializeToString(deterministic=True) for m in mine] == [
                    m.SerializeToString(deterministic=True) for m in fresh
                ]
                assert all(m.stack for m in mine)
                sent.append((message, message.SerializeToString(deterministic=True)))
            assert all(m.SerializeToString(deterministic=True) == b for m, b in sent)
        finally:
            tracker.close()
