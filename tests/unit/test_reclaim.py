"""The agent's collections after dropped analyses (node/reclaim.py): only after a drop,
never more often than the gap, and spaced by their own cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from goleash.node.reclaim import Reclaimer


@dataclass
class Cache:
    dropped: int = 0


@dataclass
class Clock:
    now: float = 100.0
    collect_s: float = 0.01  # what one collection takes
    calls: list[str] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def collect(self) -> None:
        self.calls.append("collect")
        self.now += self.collect_s

    def trim(self) -> None:
        self.calls.append("trim")


def _reclaimer(cache: Cache, clock: Clock) -> Reclaimer:
    return Reclaimer(
        cache,
        min_gap_s=2.0,
        max_time_fraction=0.01,
        clock=clock,
        collect=clock.collect,
        trim=clock.trim,
    )


def test_nothing_dropped_nothing_collected() -> None:
    cache, clock = Cache(dropped=5), Clock()  # drops before it started are not its
    r = _reclaimer(cache, clock)
    for _ in range(10):
        clock.now += 5
        assert not r.step()
    assert clock.calls == [] and r.collections == 0


def test_a_drop_is_collected_then_the_heap_trimmed_once() -> None:
    cache, clock = Cache(), Clock()
    r = _reclaimer(cache, clock)
    cache.dropped += 1
    assert r.step()
    assert clock.calls == ["collect", "trim"]
    clock.now += 10
    assert not r.step(), "nothing dropped since"
    assert r.collections == 1 and r.seconds == pytest.approx(clock.collect_s)


def test_drops_within_the_gap_wait_for_it_and_are_collected_together() -> None:
    cache, clock = Cache(), Clock()
    r = _reclaimer(cache, clock)
    cache.dropped += 1
    assert r.step()
    for _ in range(3):
        cache.dropped += 1
        clock.now += 0.5
        assert not r.step() and r.pending
    clock.now += 0.5  # 2 s after the first
    assert r.step() and not r.pending
    assert r.collections == 2


def test_an_expensive_collection_spaces_the_next_by_its_cost() -> None:
    cache, clock = Cache(), Clock(collect_s=0.5)  # a heap of millions of objects
    r = _reclaimer(cache, clock)
    cache.dropped += 1
    start = clock.now
    assert r.step()
    cache.dropped += 1
    clock.now = start + 49.0
    assert not r.step(), "0.5 s of collecting per 50 s at most (1%)"
    clock.now = start + 50.0
    assert r.step()
