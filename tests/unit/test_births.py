"""The birth records a tracker keeps between readings (node/births.py): which live
goroutines a reading asks the kernel about, and when dead records may be left."""

from __future__ import annotations

from goleash.node.births import BirthRecords
from goleash.probes.goroutines import LiveGoroutine, TrackerReading
from goleash.probes.inventory import Goroutine


def g(goid: int, gopc: int = 0x10, startpc: int = 0x20) -> Goroutine:
    return Goroutine(goid, 1, "waiting", "chan receive", 0, gopc, startpc, 0, 0, 0, 0, 0, 0, 4)


def rec(goid: int, stack_id: int = -1, gopc: int = 0x10) -> LiveGoroutine:
    return LiveGoroutine(goid, 1, gopc, 0x20, 1000 + goid, stack_id)


def reading(hits: int, *records: LiveGoroutine, stacks=None) -> TrackerReading:  # type: ignore[no-untyped-def]
    return TrackerReading(
        sites={},
        live={r.goid: r for r in records},
        counters={"create_hits": hits},
        creator_stacks=stacks or {},
    )


def test_only_goroutines_without_an_answer_are_asked_for() -> None:
    b = BirthRecords()
    live = [g(1), g(2), g(3)]
    asked = b.to_ask(live)
    assert asked == [1, 2, 3]
    b.keep(live, reading(3, rec(2), rec(3)), asked)
    assert set(b.born) == {2, 3}
    # Goroutine 1 was missed once: asked again (its birth may have raced the read).
    asked = b.to_ask(live)
    assert asked == [1]
    b.keep(live, reading(3), asked)
    # Missed twice: the kernel has no record of it, it is asked for no more.
    assert b.to_ask([*live, g(4)]) == [4]


def test_a_record_of_another_site_is_not_taken() -> None:
    b = BirthRecords()
    live = [g(5, gopc=0x99)]
    b.keep(live, reading(1, rec(5, gopc=0x10)), b.to_ask(live))
    assert b.born == {}


def test_dead_goroutines_are_forgotten_with_their_stacks() -> None:
    b = BirthRecords()
    live = [g(1), g(2)]
    b.keep(live, reading(2, rec(1, 7), rec(2, 8), stacks={7: [1], 8: [2]}), b.to_ask(live))
    assert b.stacks == {7: [1], 8: [2]}
    b.keep([g(2)], reading(2), b.to_ask([g(2)]))
    assert set(b.born) == {2}
    assert b.stacks == {8: [2]}


def test_stale_records_are_reported_while_births_or_deaths_may_have_left_some() -> None:
    b = BirthRecords()
    live = [g(1)]
    assert b.keep(live, reading(1, rec(1)), b.to_ask(live))
    # No birth since the last reading, but one in the interval before it: a goroutine
    # born after that inventory's read began is judged only now.
    assert b.keep(live, reading(1), b.to_ask(live))
    assert not b.keep(live, reading(1), b.to_ask(live)), "idle: nothing to free"
    assert b.keep(live, reading(5), b.to_ask(live)), "births: some may be dead"
    assert b.keep(live, reading(5), b.to_ask(live))
    assert not b.keep(live, reading(5), b.to_ask(live))
    assert b.keep([], reading(5), []), "a goroutine with a record died"
    assert not b.keep([], None, [])
