"""An idle process's snapshot reuses the last one's work, and is still right.

The tracker (node/summary.py) and the exporter (node/resend.py) keep what their
last summary and message were made of: while the inventory reads the same
goroutines and the probes count nothing new, only the clock-dependent numbers are
worked out again. These tests hold that against a summary and a message made from
scratch at every interval, on a real process with real probes, and check that a
process that changes after being idle (new orphans, an orphan coming of age) shows
the change in the very next snapshot."""

from __future__ import annotations

import dataclasses
import time

import pytest

import gobuild
from goleash.node.export import SnapshotExporter
from goleash.node.tracker import ProcessSnapshot, ProcessTracker
from goleash.probes.goroutines import node_program
from goleash.probes.inventory import read_goroutines
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import running_populations

pytestmark = pytest.mark.root


def _from_scratch(tracker: ProcessTracker) -> ProcessSnapshot:
    """What the tracker's last snapshot would be, worked out from scratch from the
    very read it was made of (its memory of the last summary left as it was)."""
    kept = tracker._summary
    assert kept is not None and tracker._last_inventory is not None
    try:
        return tracker._summarise(tracker._last_inventory, kept.reading)
    finally:
        tracker._summary = kept


class _Twins:
    """One tracker, two exporters: the one under test and one always from scratch
    (a snapshot without a state id is never reused)."""

    def __init__(self, proc: GoProcess, tracker: ProcessTracker) -> None:
        self.tracker = tracker
        self.mine = SnapshotExporter(proc)
        self.fresh = SnapshotExporter(proc)
        self.states: list[int] = []

    def snapshot(self) -> ProcessSnapshot:
        before = self.tracker._summary
        snap = self.tracker.snapshot()
        if before is not None and snap.state_id == before.state_id:
            scratch = _from_scratch(self.tracker)
            assert snap.sites == scratch.sites
            assert snap.ages_s == scratch.ages_s
            assert snap.orphan_goids == scratch.orphan_goids
            assert snap.totals == scratch.totals
        mine = self.mine.message(snap)
        fresh = self.fresh.message(dataclasses.replace(snap, state_id=0))
        assert mine.SerializeToString(deterministic=True) == fresh.SerializeToString(
            deterministic=True
        )
        self.states.append(snap.state_id)
        return snap


def _orphans(snap: ProcessSnapshot) -> int:
    return sum(s.orphans for s in snap.sites if s.function == "main.orphan")


def _live(snap: ProcessSnapshot, function: str) -> int:
    return sum(s.live for s in snap.sites if s.function == function)


def test_new_orphans_after_idle_intervals_are_in_the_next_snapshot() -> None:
    program = node_program()
    with (
        running_populations(gobuild.TOOLCHAINS[-1], orphan=6, condwait=2, sleeper=2) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        tracker = ProcessTracker(proc, program=program, orphan_min_age_s=0.0)
        tracker.start()
        try:
            twins = _Twins(proc, tracker)
            for _ in range(4):  # idle intervals
                snap = twins.snapshot()
                time.sleep(0.2)
            assert _orphans(snap) == 6
            assert len(set(twins.states[1:])) == 1, "an idle process was summarised again"
            kept_before = {m.goid for m in twins.mine.message(snap).goroutines_kept}

            assert pop.command("orphans 3")["orphaned"] == 3
            wait_for(
                lambda: (
                    sum(
                        g.status == "waiting" and g.wait_reason == "chan receive"
                        for g in read_goroutines(proc).goroutines
                    )
                    >= 9
                ),
                "the new orphans parked",
            )
            snap = twins.snapshot()  # the first one after the change
            assert snap.state_id != twins.states[-2]
            assert _live(snap, "main.orphan") == 9 and _orphans(snap) == 9
            message = twins.mine.message(snap)
            (row,) = [s for s in message.sites if s.function == "main.orphan"]
            assert (row.live, row.orphans.count) == (9, 9)
            assert len({m.goid for m in message.goroutines_kept} - kept_before) == 3
            for _ in range(2):  # idle again: reused again, still equal to from scratch
                snap = twins.snapshot()
            assert twins.states[-1] == twins.states[-2] and _orphans(snap) == 9
        finally:
            tracker.close()
            program.close()


def test_an_orphan_coming_of_age_ends_the_reuse() -> None:
    min_age = 2.0
    with (
        running_populations(gobuild.TOOLCHAINS[-1], orphan=3) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        tracker = ProcessTracker(proc, use_probes=False, orphan_min_age_s=min_age)
        tracker.start()
        try:
            twins = _Twins(proc, tracker)
            assert pop.command("orphans 2")["orphaned"] == 2  # young ones
            wait_for(
                lambda: (
                    sum(g.wait_reason == "chan receive" for g in read_goroutines(proc).goroutines)
                    >= 5
                ),
                "the young orphans parked",
            )
            first = twins.snapshot()
            young = [g for g, age in first.ages_s.items() if age < min_age - 0.5]
            assert len(young) >= 2, "the new orphans are young at the first snapshot"
            orphans_then = _orphans(first)

            def all_of_age() -> ProcessSnapshot | None:
                snap = twins.snapshot()
                return snap if _orphans(snap) == 5 else None

            snap = wait_for(all_of_age, "the young orphans counted once of age", 30.0)
            assert orphans_then < 5
            # Reused while nothing came of age, summarised again when it did.
            assert len(set(twins.states)) < len(twins.states), "never reused"
            assert twins.states[-1] != twins.states[0]
            assert all(snap.ages_s[g] >= min_age for g in young)
        finally:
            tracker.close()
