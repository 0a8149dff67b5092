"""A goroutine's age is never negative: one born while the inventory was read (its
birth record, read after, is later than the read's start) is of age 0. The control
plane refuses a negative age, and with it the agent's whole batch (seen in the
torture test: the stream broke and reconnected for ~35 s)."""

from __future__ import annotations

from goleash.node.tracker import ProcessTracker
from goleash.probes.goroutines import LiveGoroutine


def test_a_goroutine_born_during_the_inventory_read_is_of_age_zero() -> None:
    tracker = ProcessTracker(None, use_probes=False)  # type: ignore[arg-type]
    read_ns = 5_000_000_000
    born = {
        7: LiveGoroutine(7, 1, 0x1000, 0x2000, read_ns + 71_413, -1),  # during the read
        8: LiveGoroutine(8, 1, 0x1000, 0x2000, read_ns - 2_000_000_000, -1),
    }
    assert tracker._birth_ns(7, born, read_ns) == read_ns
    assert tracker._birth_ns(8, born, read_ns) == read_ns - 2_000_000_000
    tracker.first_seen_ns[9] = read_ns - 1
    assert tracker._birth_ns(9, born, read_ns) == read_ns - 1  # first seen: a lower bound
    assert tracker._birth_ns(10, born, read_ns) == read_ns  # seen now for the first time
