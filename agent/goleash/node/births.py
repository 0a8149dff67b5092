"""The probes' birth records of one process's live goroutines, kept between readings.

A birth record (creation time, parent, creator stack) is written by the creation
probe into the kernel's tables; the memory inventory says which goroutines live. A
busy service leaves ~100k records of goroutines born and dead within an interval,
none of which a snapshot needs: each reading asks the kernel only for live
goroutines it has no answer for yet (probes/goroutine_program.py births_of), so its
cost follows the new live goroutines, not the births.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from goleash.probes.goroutines import LiveGoroutine, TrackerReading
from goleash.probes.inventory import Goroutine


@dataclass
class BirthRecords:
    # Records of live goroutines, verified by goid and creation site. Kept here: the
    # kernel's slot of one may be taken by a later birth.
    born: dict[int, LiveGoroutine] = field(default_factory=dict)
    # Creator stack id -> its PCs, for the stacks records in `born` refer to.
    stacks: dict[int, list[int]] = field(default_factory=dict)
    # Live goroutines the kernel has no record of (born before the probes, or while
    # they were off, or dropped): asked for no more. A goroutine goes here when two
    # readings in a row miss it: the first may have raced its birth, whose record is
    # written just after the g turns runnable.
    _unrecorded: set[int] = field(default_factory=set)
    _missed: set[int] = field(default_factory=set)
    # The creation probe's hit count at the last two readings.
    _hits: tuple[int, int] = (-1, -1)

    def to_ask(self, goroutines: Sequence[Goroutine]) -> list[int]:
        """The live goroutines a reading should look up."""
        known, unrecorded = self.born, self._unrecorded
        return [g.goid for g in goroutines if g.goid not in known and g.goid not in unrecorded]

    def keep(
        self, goroutines: Sequence[Goroutine], reading: TrackerReading | None, asked: list[int]
    ) -> bool:
        """Take READING's records of the live GOROUTINES (it looked up ASKED); forget
        the dead. Returns whether the kernel may hold records of goroutines no longer
        live (a record died, or births happened: some may have died unseen)."""
        live = {g.goid: g for g in goroutines}
        before = len(self.born)
        self.born = {goid: b for goid, b in self.born.items() if goid in live}
        died = len(self.born) < before
        if reading is None:
            return False
        for goid, b in reading.live.items():
            g = live.get(goid)
            if g is not None and (g.gopc, g.startpc) == (b.gopc, b.startpc):
                self.born[goid] = b
        missed = {goid for goid in asked if goid not in self.born}
        self._unrecorded = (self._unrecorded | (missed & self._missed)) & live.keys()
        self._missed = missed
        if reading.creator_stacks or self.stacks:
            self.stacks.update(reading.creator_stacks)
            used = {b.stack_id for b in self.born.values()}
            self.stacks = {sid: pcs for sid, pcs in self.stacks.items() if sid in used}
        # A birth after the inventory's read began is judged by the reconcile after
        # next: compare with the count two readings ago.
        hits = reading.counters.get("create_hits", 0)
        births = hits != self._hits[0]
        self._hits = (self._hits[1], hits)
        return died or births
