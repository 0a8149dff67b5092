"""A process's summary by creation site, and what lets the next interval reuse it.

On a node most followed processes are idle: from one interval to the next the
memory inventory reads the very same goroutines (probes/inventory.py hands back the
same Goroutine objects for unchanged g structs) and the probes count nothing new.
Then everything a snapshot says is what it said last time but for the clock: ages
grow, and an orphan candidate may come of age. `Summary` keeps the births behind
each site's age quantiles, so the ages at a later read are worked out with the very
expression a fresh summary would use (same floats), and knows the first moment an
orphan candidate would turn into an orphan: from then on it is no longer reused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from goleash.probes.goroutines import TrackerReading
from goleash.probes.inventory import Goroutine

_state_ids = itertools.count(1)


@dataclass
class SiteSummary:
    """One creation site: the function a `go` statement starts, and where."""

    function: str
    go_statement: str
    live: int
    created: int
    exited: int
    exited_unseen: int
    age_p50_s: float | None
    age_p99_s: float | None
    age_max_s: float | None
    wait_reasons: dict[str, int]
    orphans: int
    lifetime_mean_s: float | None
    gopc: int = 0
    startpc: int = 0
    creator_stack: list[str] = field(default_factory=list)  # with --stacks: "func file:line"
    # the oldest was there before the probes saw it born: age_max_s is a lower bound
    age_max_lower_bound: bool = False


def quantile_index(n: int, q: float) -> int:
    """Index of quantile Q in N sorted values (the tracker's choice)."""
    return min(n - 1, max(0, round(q * (n - 1))))


class Summary:
    """The sites of one snapshot and what they were made from (see the module doc)."""

    def __init__(
        self,
        goroutines: list[Goroutine],
        reading: TrackerReading | None,
        lifetimes: str,
        births: dict[int, int],
    ) -> None:
        self.state_id = next(_state_ids)
        self.goroutines = goroutines
        self.reading = reading
        self.lifetimes = lifetimes
        self.births = births  # goid -> birth (or first sight), CLOCK_MONOTONIC ns
        self.orphan_goids: set[int] = set()
        self.sites: list[SiteSummary] = []
        self._site_births: dict[int, list[int]] = {}  # id(site) -> births, youngest first
        self._orphan_of_age: tuple[int, float] | None = None  # (birth, minimum age s)

    def add_site(self, site: SiteSummary, births_youngest_first: list[int]) -> None:
        self.sites.append(site)
        self._site_births[id(site)] = births_youngest_first

    def becomes_orphan(self, birth_ns: int, min_age_s: float) -> None:
        """A goroutine that is an orphan in all but age, born at BIRTH_NS."""
        if not math.isfinite(min_age_s):
            return
        if self._orphan_of_age is None or birth_ns < self._orphan_of_age[0]:
            self._orphan_of_age = (birth_ns, min_age_s)

    def still_true(
        self,
        inv_goroutines: list[Goroutine],
        read_ns: int,
        reading: TrackerReading | None,
        lifetimes: str,
    ) -> bool:
        """Whether a fresh summary of this read would differ only in its ages."""
        if lifetimes != self.lifetimes or len(inv_goroutines) != len(self.goroutines):
            return False
        # The same objects for g structs that did not change at all (the read's memo),
        # equal ones for those whose other fields did (a sleeper woke and slept again).
        pairs = zip(inv_goroutines, self.goroutines, strict=True)
        if not all(a is b or a == b for a, b in pairs):
            return False
        if reading != self.reading:
            return False
        if self._orphan_of_age is not None:
            birth, min_age = self._orphan_of_age
            if (read_ns - birth) / 1e9 >= min_age:  # the tracker's own test
                return False
        return True

    def ages_at(self, read_ns: int) -> dict[int, float]:
        return {goid: (read_ns - b) / 1e9 for goid, b in self.births.items()}

    def sites_at(self, read_ns: int) -> list[SiteSummary]:
        """The sites with their ages at READ_NS (the same order)."""
        out = []
        for s in self.sites:
            births = self._site_births[id(s)]
            if not births:
                out.append(s)
                continue
            n = len(births)
            # A copy with three fields changed (dataclasses.replace is 5x slower).
            now = object.__new__(SiteSummary)
            now.__dict__.update(s.__dict__)
            now.age_p50_s = (read_ns - births[quantile_index(n, 0.5)]) / 1e9
            now.age_p99_s = (read_ns - births[quantile_index(n, 0.99)]) / 1e9
            now.age_max_s = (read_ns - births[-1]) / 1e9
            out.append(now)
        return out
