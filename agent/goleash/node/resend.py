"""The message an exporter sent last, and how to send it again a little later.

When a process's snapshot is of the same state as the previous one (node/summary.py:
same goroutines, same counts), its message differs from the previous message only in
what the clock moves: the time, ages, how long goroutines have been blocked, and the
deltas (created, exited: zero now, so sites alive only through them drop out).
`Sent` remembers which goroutines each of those numbers is of, so the next message is
a copy of the last with those numbers read again, equal to one made from scratch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.node.tracker import ProcessSnapshot
from goleash.probes.inventory import Goroutine
from goleash.probes.stacks import Stack

_QUANTILES = (0.5, 0.9, 0.99)


def quantile_goids(by_age: Sequence[Goroutine]) -> tuple[int, ...]:
    """The goids whose ages are a site's p50, p90, p99 and max (export._quantiles's
    picks), BY_AGE youngest first; () for none."""
    n = len(by_age)
    if not n:
        return ()
    picks = [by_age[min(n - 1, max(0, round(q * (n - 1))))] for q in _QUANTILES]
    return (*(g.goid for g in picks), by_age[-1].goid)


@dataclass
class RowAges:
    """Of one site row: whose ages its quantiles are, and its orphans."""

    goids: tuple[int, ...]  # p50, p90, p99, max; () without live goroutines
    eldest_orphan: int
    orphans: list[Goroutine]


@dataclass
class Sent:
    """One message as sent and what its clock-dependent numbers were made from."""

    state_id: int
    keep: bool
    out: ing.ProcessSnapshot
    rows: list[RowAges] = field(default_factory=list)  # as out.sites
    kept: list[Goroutine] = field(default_factory=list)  # as out.goroutines_kept
    stacks: list[Stack | None] = field(default_factory=list)  # their walks

    def next_message(
        self,
        snap: ProcessSnapshot,
        stacks: dict[int, Stack],
        blocked: Callable[[ProcessSnapshot, Goroutine], float],
    ) -> ing.ProcessSnapshot | None:
        """The message for SNAP (of this state, a later clock), the kept goroutines'
        stacks walked again as STACKS; None when a stack differs (then from scratch)."""
        walked = [stacks.get(g.goid) for g in self.kept]
        if any(a is not b and a != b for a, b in zip(walked, self.stacks, strict=True)):
            return None
        ages: dict[int, float] = snap.ages_s
        out = ing.ProcessSnapshot()
        out.CopyFrom(self.out)
        for name in ("latency", "panics", "drops"):  # this call's own, added by the caller
            out.ClearField(name)
        out.time_unix_nano = int(snap.taken_at * 1e9)
        rows: list[RowAges] = []
        gone = []
        for i, (row, a) in enumerate(zip(out.sites, self.rows, strict=True)):
            if not row.live:  # there only for its created/exited, zero now
                gone.append(i)
                continue
            rows.append(a)
            row.created = row.exited = 0
            if a.goids:
                p50, p90, p99, mx = (ages.get(goid, 0.0) for goid in a.goids)
                row.age.p50_seconds, row.age.p90_seconds = p50, p90
                row.age.p99_seconds, row.age.max_seconds = p99, mx
            if a.orphans:
                row.orphans.oldest_age_seconds = ages.get(a.eldest_orphan, 0.0)
                row.orphans.longest_blocked_seconds = max(blocked(snap, g) for g in a.orphans)
        for i in reversed(gone):
            del out.sites[i]
        for m, g in zip(out.goroutines_kept, self.kept, strict=True):
            m.age_seconds = ages.get(g.goid, 0.0)
            m.blocked_for_seconds = blocked(snap, g)
        self.out, self.rows, self.stacks = out, rows, walked
        return out
