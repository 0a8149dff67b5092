"""One tracker per traced process: probes + memory inventory + overhead budget.

The probes count births and exits per creation site since attach and know each
new goroutine's birth time and parent; the inventory (process memory) sees every
live goroutine with its state and wait reason, including those born before
attach or started without newproc (iter.Pull coroutines). A snapshot joins both.
When the probes cost more than the budget allows, they are detached and the
inventory alone carries on (mode "inventory-only"); they return once the
creation rate (read from goid growth) fits the budget again.

By default the probes trap only goroutine creation. Exits per site then follow
from the counts: exits = created + live at start - live now (births counted by
the probes, live counts read from memory). Each interval asks the kernel only for
the birth records of live goroutines not known yet (node/births.py); records of
dead goroutines are left for later births to take. `lifetimes=True`
(`--lifetimes`) also traps runtime.goexit1 for exact per-site lifetimes; over
budget that probe goes first (lifetimes become a sample), the creation probe next.
With the probes off, goroutines created are counted from the runtime's own goid
generator (probes/goidgen.py).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from goleash.errors import GoleashError, StageFailure
from goleash.gobin.errors import ProcessError
from goleash.node import DEFAULT_ORPHAN_MIN_AGE_S  # noqa: F401  (defined there for the CLI)
from goleash.node.births import BirthRecords
from goleash.node.summary import SiteSummary, Summary, quantile_index
from goleash.probes.budget import OverheadBudget
from goleash.probes.creation import site_at
from goleash.probes.goidgen import GoidCounter, GoidgenUnavailable, checked_goid_counter
from goleash.probes.goroutines import (
    GoroutineProbes,
    GoroutineProgram,
    TrackerReading,
)
from goleash.probes.inventory import (
    MEMO_MAX_GS,
    Goroutine,
    Inventory,
    ReadMemo,
    read_goroutines,
)
from goleash.probes.target import GoProcess

# Wait reasons that cannot end by themselves: nobody else holds a reference that
# would wake the goroutine once its parent is gone (DESIGN.md "Orphans and leaks").
STUCK_WAIT_REASONS = frozenset(
    {
        "chan receive",
        "chan send",
        "chan receive (nil chan)",
        "chan send (nil chan)",
        "select",
        "select (no cases)",
        "sync.Cond.Wait",
        "semacquire",
        "sync.Mutex.Lock",
        "sync.RWMutex.RLock",
        "sync.RWMutex.Lock",
        "sync.WaitGroup.Wait",
    }
)

BUDGET_MIN_WINDOW_S = 1.0

# ProcessSnapshot.lifetimes
LIFETIMES_EXACT = "exact"  # the exit probe saw every exit since attach
LIFETIMES_SAMPLED = "sampled"  # the budget took the exit probe off for a while
LIFETIMES_OFF = "off"  # no exit probe (the default): exits derived, no lifetimes


def _read_inventory(proc: GoProcess, memo: ReadMemo | None = None) -> Inventory:
    """The live goroutines; a failure other than the process's own (gone, unreadable)
    is named as the inventory stage's, for the agent to count."""
    try:
        return read_goroutines(proc, memo)
    except GoleashError:
        raise
    except Exception as exc:
        raise StageFailure("inventory", exc) from exc


def _quantile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[quantile_index(len(sorted_vals), q)]


@dataclass
class ProcessSnapshot:
    pid: int
    exe: str
    go_version: str
    taken_at: float  # unix time
    mode: str  # "probes" | "inventory-only"
    mode_reason: str
    sites: list[SiteSummary]
    totals: dict[str, int]
    dropped: dict[str, int]
    probe_hits: dict[str, int]
    overhead_fraction: float
    overhead_cap: float | None  # None: no limit (--budget none)
    inventory_ms: float
    torn_reads: int
    goroutines: list[Goroutine] = field(default_factory=list, repr=False)
    # Per live goroutine (by goid), for exporters that keep individual goroutines:
    # age (from the probes' birth time, else first sight: a lower bound), the creator's
    # goid when known, and whether it counted as an orphan.
    ages_s: dict[int, float] = field(default_factory=dict, repr=False)
    # goids whose age counts from when they were first seen, not from their birth
    ages_lower_bound: frozenset[int] = field(default_factory=frozenset, repr=False)
    parents: dict[int, int] = field(default_factory=dict, repr=False)
    orphan_goids: frozenset[int] = field(default_factory=frozenset, repr=False)
    read_ns: int = 0  # CLOCK_MONOTONIC of the inventory read (Goroutine.wait_since_ns's clock)
    # Per-site lifetimes (lifetime_mean_s): "exact", "sampled" or "off" (LIFETIMES_*).
    lifetimes: str = LIFETIMES_OFF
    # Where totals["created"] comes from: "probes" (every birth trapped since attach)
    # or "goidgen" (the runtime's goid counter, when the probes were off for a while:
    # within created_error_bound, 16 goids cached per P).
    created_source: str = "probes"
    created_error_bound: int | None = 0
    # Snapshots of one tracker with the same state_id saw the same goroutines and
    # counts; only the clock moved (ages, times blocked). Exporters reuse their work.
    state_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in (
            "goroutines",
            "ages_s",
            "ages_lower_bound",
            "parents",
            "orphan_goids",
            "state_id",
        ):
            d.pop(k)
        return d


class ProcessTracker:
    def __init__(
        self,
        proc: GoProcess,
        *,
        stacks: bool = False,
        budget: OverheadBudget | None = None,
        max_live: int | None = None,
        max_sites: int | None = None,
        orphan_min_age_s: float = DEFAULT_ORPHAN_MIN_AGE_S,
        use_probes: bool = True,
        program: GoroutineProgram | None = None,
        lifetimes: bool = False,
    ) -> None:
        """With `program` (the agent's), the probes share that compiled program with
        every other process; stacks, max_live and max_sites are then the program's.
        LIFETIMES: also trap goroutine exits, for exact per-site lifetimes."""
        self.proc = proc
        self.budget = budget or OverheadBudget()
        self.lifetimes_wanted = lifetimes
        kw: dict[str, Any] = {"stacks": stacks, "program": program, "lifetimes": lifetimes}
        if max_live:
            kw["max_live"] = max_live
        if max_sites:
            kw["max_sites"] = max_sites
        self.probes = GoroutineProbes(proc, **kw) if use_probes else None
        self.orphan_min_age_s = orphan_min_age_s
        self.first_seen_ns: dict[int, int] = {}
        self._last_hits = 0
        self._last_poll = time.monotonic()
        self._last_max_goid = 0
        self.mode_reason = "probes attached"
        self._last_inventory: Inventory | None = None
        self._read_memo = ReadMemo()  # what did not change since the last read: not again
        self.births = BirthRecords()  # the probes' records of live goroutines
        # Derived exits: live per site when the probes went on, and the goroutines
        # already live then (their exits are exits of goroutines born unseen).
        self._live_at_start: Counter[tuple[int, int]] = Counter()
        self._unborn: dict[int, tuple[int, int]] = {}  # goid -> site, live at start
        self._unborn_exited: Counter[tuple[int, int]] = Counter()
        self._births_missed = False  # the creation probe was off for a while
        self._exits_missed = False  # the exit probe was off for a while (--lifetimes)
        self._goids: GoidCounter | None = None
        self._goidgen_at_start = 0
        self._last_goidgen = 0
        self.goidgen_unavailable = ""  # why the goid counter cannot be read, if so
        # The last summary and what it was made from: reused while nothing changed.
        self._summary: Summary | None = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Inventory first (the whole picture at attach), then the probes."""
        inv = _read_inventory(self.proc)
        self._last_inventory = inv
        self._remember(inv.goroutines, inv.read_ns)
        for g in inv.goroutines:
            site = (g.gopc, g.startpc)
            self._live_at_start[site] += 1
            self._unborn[g.goid] = site
        self._start_goid_counter(inv)
        if self.probes is not None:
            self.probes.attach()
            # The probes went to /proc/PID/exe at offsets computed from the file that
            # was analysed: if PID exec'd (or was reused) meanwhile, they sit in another
            # program. Take them out again before that program runs into them.
            if not self.proc.same_executable():
                self.probes.close()
                raise ProcessError(f"PID {self.proc.pid}: exited or exec'd while attaching")
        else:
            self.mode_reason = "probes off (inventory only)"
        self._last_poll = time.monotonic()

    def _start_goid_counter(self, inv: Inventory) -> None:
        try:
            self._goids = checked_goid_counter(
                self.proc, max((g.goid for g in inv.goroutines), default=0)
            )
            self._goidgen_at_start = self._last_goidgen = self._goids.read()
        except GoidgenUnavailable as exc:
            self._goids = None
            self.goidgen_unavailable = str(exc)

    def _read_goidgen(self) -> int | None:
        if self._goids is None:
            return None
        try:
            value = self._goids.read()
        except GoidgenUnavailable as exc:
            self.goidgen_unavailable = str(exc)
            return None
        self._last_goidgen = max(self._last_goidgen, value)
        return value

    def close(self) -> None:
        if self.probes is not None:
            self.probes.close()

    @property
    def lifetimes(self) -> str:
        if not self.lifetimes_wanted or self.probes is None:
            return LIFETIMES_OFF
        return LIFETIMES_SAMPLED if self._exits_missed else LIFETIMES_EXACT

    @property
    def mode(self) -> str:
        return "probes" if self.probes is not None and self.probes.attached else "inventory-only"

    # --- naming ------------------------------------------------------------------------

    def site_name(self, gopc: int, startpc: int) -> tuple[str, str]:
        site = site_at(self.proc, gopc, startpc)
        return site.function, site.go_statement

    def creator_stack(self, gopc: int, pcs: list[int]) -> list[str]:
        """The creator's stack as "function file:line", innermost first. The kernel's
        walk starts inside runtime.newproc; where its probe sits before newproc's
        frame is built (Go 1.21+, `push %rbp`), the walk skips the function holding
        the `go` statement, so that frame comes from gopc instead."""
        tab = self.proc.pclntab
        frames: list[str] = []
        head = tab.call_site(gopc) if gopc else None
        for pc in pcs[1:]:  # pcs[0] is runtime.newproc itself
            sl = tab.source_line(pc - 1)
            if sl is not None:
                frames.append(f"{sl.function} {sl.file}:{sl.line}")
        if head is not None and not (frames and frames[0].startswith(head.function + " ")):
            frames.insert(0, f"{head.function} {head.file}:{head.line}")
        elif head is not None:
            frames[0] = f"{head.function} {head.file}:{head.line}"
        return frames

    def _remember(self, goroutines: list[Goroutine], now_ns: int) -> None:
        seen = set()
        for g in goroutines:
            seen.add(g.goid)
            self.first_seen_ns.setdefault(g.goid, now_ns)
        for goid in list(self.first_seen_ns):
            if goid not in seen:
                del self.first_seen_ns[goid]

    # --- budget ---------------------------------------------------------------------------

    def _apply_budget(self, reading: TrackerReading | None, new_goids: int, dt: float) -> None:
        """NEW_GOIDS: goroutines created since the last poll, from memory (what the
        probes would have trapped while off)."""
        if self.probes is None:
            return
        if reading is not None and self.probes.attached:
            hits = reading.counters["create_hits"] + reading.counters["exit_hits"]
            new_hits = hits - self._last_hits
            self._last_hits = hits
        else:
            per_goroutine = 2 if self.lifetimes_wanted else 1
            new_hits = per_goroutine * max(0, new_goids)
        stepped = self.probes.stepped_sites
        emulated_hits = new_hits if stepped == 0 else new_hits // 2
        stepped_hits = 0 if stepped == 0 else new_hits - emulated_hits
        over = self.budget.update(emulated_hits, stepped_hits, dt)
        cost = (
            f"they would cost {self.budget.last_fraction:.1%} of a core "
            f"(budget {self.budget.cpu_fraction:.1%})"
        )
        if self.probes.attached:
            if over and self.probes.exits_attached:
                # The exit probe goes first: births stay counted, lifetimes sampled.
                self.probes.detach_exits()
                self._exits_missed = True
                self.mode_reason = f"exit probe detached: {cost}; lifetimes sampled"
            elif self.budget.last_fraction > self.budget.cpu_fraction:
                self.probes.detach()
                self._births_missed = True
                self._exits_missed = self._exits_missed or self.lifetimes_wanted
                self.mode_reason = f"probes detached: {cost}; counting from memory only"
            elif not over and self.lifetimes_wanted and not self.probes.exits_attached:
                self.probes.attach_exits()
                self.mode_reason = "exit probe re-attached: back under budget"
        elif not over:
            self.probes.attach()
            self.mode_reason = "probes re-attached: back under budget"

    def _probe_reading(self, inv: Inventory) -> TrackerReading | None:
        """The probes' counts and the birth records of INV's goroutines not known yet;
        then the kernel's records of goroutines no longer live are freed (hash
        entries, slots with the exit probe on) or left for births to take."""
        if self.probes is None or not self.probes.compiled:
            self.births.keep(inv.goroutines, None, [])
            return None
        asked = self.births.to_ask(inv.goroutines)
        reading = self.probes.read(goids=asked)
        if self.births.keep(inv.goroutines, reading, asked):
            self.probes.reconcile(frozenset(g.goid for g in inv.goroutines), inv.read_ns)
        self.probes.records_read(inv.read_ns)
        return reading

    def _count_unborn_exits(self, inv: Inventory) -> None:
        """Exits of goroutines that were live when the probes went on."""
        if not self._unborn:
            return
        live = {g.goid for g in inv.goroutines}
        for goid in [goid for goid in self._unborn if goid not in live]:
            self._unborn_exited[self._unborn.pop(goid)] += 1

    def _birth_ns(self, goid: int, born: dict, now_ns: int) -> int:
        """Birth time from the probes, else when we first saw it (a lower bound); never
        after NOW_NS (when the inventory read began): a goroutine born during the read
        is of age 0, not negative (the control plane refuses a batch with a negative
        age, and the agent's stream with it)."""
        if goid in born:
            return min(born[goid].created_ns, now_ns)
        return self.first_seen_ns.get(goid, now_ns)

    @staticmethod
    def _parent(g: Goroutine, born: dict) -> int:
        return g.parent_goid or (born[g.goid].parent_goid if g.goid in born else 0)

    def _is_orphan(self, g: Goroutine, age_s: float, born: dict, live: set[int]) -> bool:
        parent = self._parent(g, born)
        return bool(
            parent
            and parent not in live
            and g.wait_reason in STUCK_WAIT_REASONS
            and age_s >= self.orphan_min_age_s
        )

    # --- snapshot ----------------------------------------------------------------------------

    def final_snapshot(self) -> ProcessSnapshot:
        """After the process exited: the kernel's counts (the maps outlive the
        process) joined with the last inventory we read."""
        assert self._last_inventory is not None, "start() reads an inventory"
        return self.snapshot(inventory=self._last_inventory)

    def snapshot(self, inventory: Inventory | None = None) -> ProcessSnapshot:
        inv, reading = self._read(inventory)
        last = self._summary
        if last is not None and last.still_true(
            inv.goroutines, inv.read_ns, reading, self.lifetimes
        ):
            # An idle process (the common case on a node): the same goroutines and
            # counts as last time. Only the clock moved: same summary, ages now.
            sites = last.sites_at(inv.read_ns)
            ages_s = last.ages_at(inv.read_ns)
            return self._process_snapshot(
                inv, reading, sites, ages_s, last.orphan_goids, self.births.born, last.state_id
            )
        return self._summarise(inv, reading)

    def _summarise(self, inv: Inventory, reading: TrackerReading | None) -> ProcessSnapshot:
        """The snapshot of INV and READING worked out from scratch (and remembered)."""
        born = self.births.born
        by_site: dict[tuple[int, int], list[Goroutine]] = {}
        for g in inv.goroutines:
            by_site.setdefault((g.gopc, g.startpc), []).append(g)
        keys = set(by_site) | (set(reading.sites) if reading else set())
        live_by_goid = {g.goid for g in inv.goroutines}
        births = {g.goid: self._birth_ns(g.goid, born, inv.read_ns) for g in inv.goroutines}
        summary = Summary(inv.goroutines, reading, self.lifetimes, births)
        for key in keys:
            members = by_site.get(key, [])
            member_ages = [(inv.read_ns - births[g.goid]) / 1e9 for g in members]
            orphans = 0
            for g, age in zip(members, member_ages, strict=True):
                if self._is_orphan(g, age, born, live_by_goid):
                    orphans += 1
                    summary.orphan_goids.add(g.goid)
                elif self._is_orphan(g, math.inf, born, live_by_goid):
                    summary.becomes_orphan(births[g.goid], self.orphan_min_age_s)
            site = self._site_summary(key, members, member_ages, orphans, reading, born)
            summary.add_site(site, sorted(births[g.goid] for g in members)[::-1])
        summary.sites.sort(key=lambda s: (-s.live, -s.created, s.function))
        # Kept for reuse only where the inventory's memo is (a bounded memory cost).
        self._summary = summary if len(inv.goroutines) <= MEMO_MAX_GS else None
        return self._process_snapshot(
            inv,
            reading,
            summary.sites,
            summary.ages_at(inv.read_ns),
            summary.orphan_goids,
            born,
            summary.state_id,
        )

    def _read(self, inventory: Inventory | None) -> tuple[Inventory, TrackerReading | None]:
        """The live goroutines (INVENTORY if given, else read now) and the probes'
        reading; the overhead budget judged on a fresh read only."""
        now = time.monotonic()
        # The budget is a share of a core over time: a burst read over a few
        # milliseconds (two snapshots close together) is judged over one second.
        dt = max(BUDGET_MIN_WINDOW_S, now - self._last_poll)
        self._last_poll = now
        inv = inventory or _read_inventory(self.proc, self._read_memo)
        self._last_inventory = inv
        self._remember(inv.goroutines, inv.read_ns)
        reading = self._probe_reading(inv)
        self._count_unborn_exits(inv)
        max_goid = max((g.goid for g in inv.goroutines), default=self._last_max_goid)
        if inventory is None:
            # Goroutines created since the last poll: the runtime's goid counter,
            # else the growth of the largest live goid (a lower bound).
            before = self._last_goidgen
            goidgen = self._read_goidgen()
            new_goids = goidgen - before if goidgen is not None else max_goid - self._last_max_goid
            self._apply_budget(reading, new_goids, dt)
        self._last_max_goid = max(self._last_max_goid, max_goid)
        return inv, reading

    def _site_stack(self, key: tuple[int, int], members: list[Goroutine], born: dict) -> list[str]:
        """The creator's stack of one of the site's goroutines the probes saw born."""
        stacks = self.births.stacks
        sid = next(
            (
                born[g.goid].stack_id
                for g in members
                if g.goid in born and born[g.goid].stack_id in stacks
            ),
            None,
        )
        return [] if sid is None else self.creator_stack(key[0], stacks[sid])

    def _site_summary(
        self,
        key: tuple[int, int],
        members: list[Goroutine],
        member_ages: list[float],
        orphans: int,
        reading: TrackerReading | None,
        born: dict,
    ) -> SiteSummary:
        """One creation site: its live MEMBERS (ages in MEMBER_AGES, same order) joined
        with the probes' counts for it."""
        counts = reading.sites.get(key) if reading else None
        ages = sorted(member_ages)
        reasons = Counter(g.wait_reason for g in members if g.wait_reason)
        fn, stmt = self.site_name(*key)
        stack: list[str] = []
        if reading is not None and self.births.stacks:
            stack = self._site_stack(key, members, born)
        created = counts.created if counts else 0
        if self.lifetimes == LIFETIMES_EXACT:
            exited = counts.exited if counts else 0
            exited_unseen = counts.exited_unseen if counts else 0
        else:
            # Exits follow from births and live counts (no exit trap, or not always).
            all_exits = max(0, created + self._live_at_start[key] - len(members))
            exited_unseen = min(all_exits, self._unborn_exited[key])
            exited = all_exits - exited_unseen
        lifetime_mean_s = None
        if self.lifetimes != LIFETIMES_OFF and counts and counts.exited:
            lifetime_mean_s = counts.lifetime_sum_ns / counts.exited / 1e9
        oldest = max(range(len(members)), key=member_ages.__getitem__, default=None)
        oldest_unborn = oldest is not None and members[oldest].goid not in born
        return SiteSummary(
            function=fn,
            go_statement=stmt,
            live=len(members),
            created=created,
            exited=exited,
            exited_unseen=exited_unseen,
            age_p50_s=_quantile(ages, 0.5),
            age_p99_s=_quantile(ages, 0.99),
            age_max_s=ages[-1] if ages else None,
            wait_reasons=dict(reasons.most_common(3)),
            orphans=orphans,
            lifetime_mean_s=lifetime_mean_s,
            gopc=key[0],
            startpc=key[1],
            creator_stack=stack,
            age_max_lower_bound=oldest_unborn,
        )

    def _process_snapshot(
        self,
        inv: Inventory,
        reading: TrackerReading | None,
        sites: list[SiteSummary],
        ages_s: dict[int, float],
        orphan_goids: set[int] | frozenset[int],
        born: dict,
        state_id: int,
    ) -> ProcessSnapshot:
        counters = reading.counters if reading else {}
        created = sum(s.created for s in sites)
        created_source = "probes"
        bound: int | None = 0
        if (self._births_missed or self.probes is None) and self._goids is not None:
            created_source = "goidgen"
            created = max(0, self._last_goidgen - self._goidgen_at_start)
            bound = self._goids.error_bound()
        return ProcessSnapshot(
            pid=self.proc.pid,
            exe=self.proc.exe_name,
            go_version=self.proc.build_info.go_version,
            taken_at=time.time(),
            mode=self.mode,
            mode_reason=self.mode_reason,
            sites=sites,
            totals={
                "live": len(inv.goroutines),
                "created": created,
                "exited": sum(s.exited + s.exited_unseen for s in sites),
                "orphans": sum(s.orphans for s in sites),
            },
            dropped={
                k: v
                for k, v in counters.items()
                if k in ("live_table_full", "site_table_full", "read_faults", "stack_faults")
            },
            probe_hits={k: v for k, v in counters.items() if k.endswith("_hits")},
            overhead_fraction=self.budget.last_fraction,
            overhead_cap=(
                self.budget.cpu_fraction if math.isfinite(self.budget.cpu_fraction) else None
            ),
            inventory_ms=inv.read_ms if hasattr(inv, "read_ms") else 0.0,
            torn_reads=inv.torn,
            goroutines=inv.goroutines,
            ages_s=ages_s,
            ages_lower_bound=frozenset(g.goid for g in inv.goroutines if g.goid not in born),
            parents={g.goid: p for g in inv.goroutines if (p := self._parent(g, born))},
            orphan_goids=frozenset(orphan_goids),
            read_ns=inv.read_ns,
            lifetimes=self.lifetimes,
            created_source=created_source,
            created_error_bound=bound,
            state_id=state_id,
        )
