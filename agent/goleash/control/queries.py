"""The typed read model: what the Store knows about a selection of processes, as plain
dataclasses, for readers inside the control plane (the policy engine) and for the
gRPC servicer, whose `answers` turn them into protos (`messages`).

Ingest and state stay in `state.py`; this module only reads them: processes, creation
sites, kept goroutines, orphans, leak suspects and function latency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import detect
from goleash.control.histogram import Histogram
from goleash.control.limits import InvalidArgument, NotFound
from goleash.control.records import (
    CREATED,
    EXITED,
    LIVE,
    PANICS,
    ProcState,
    Selection,
    ServiceState,
    SiteKey,
    SiteState,
)
from goleash.control.state import DEFAULT_QUANTILES, Store, non_negative
from goleash.control.windows import covered


@dataclass(frozen=True)
class ProcessRow:
    """One followed process over a window."""

    info: t.ProcessInfo  # what the agent reported about it
    agent_id: str
    node_name: str
    state: int  # a goleash.v1.ProcessState number
    first_seen: float
    last_seen: float
    goroutines: int
    created: int
    exited: int
    orphans: int
    panics: int
    drops: Counter[str]
    gone_reason: str

    @property
    def running(self) -> bool:
        return self.state == q.PROCESS_STATE_RUNNING


@dataclass(frozen=True)
class ProcessList:
    window_seconds: float  # the window the counts cover
    total: int  # processes selected, before `limit`
    rows: Iterator[ProcessRow]  # computed as read: a caller may stop early


_ORDERS: dict[int, Callable[[ProcState], Any]] = {
    q.PROCESS_ORDER_UNSPECIFIED: lambda p: (p.service, p.key),
    q.PROCESS_ORDER_GOROUTINES: lambda p: (-p.goroutines, p.service, p.key),
    q.PROCESS_ORDER_ORPHANS: lambda p: (-p.orphans, -p.goroutines, p.service, p.key),
}


def processes(
    store: Store,
    sel: Selection,
    now: float,
    *,
    window_seconds: float = 0.0,
    include_gone: bool = False,
    order_by: int = q.PROCESS_ORDER_UNSPECIFIED,
    limit: int = 0,
) -> ProcessList:
    """The selected processes (NotFound for an unknown service, agent or pid)."""
    w = store.window(window_seconds)
    order = _ORDERS.get(order_by)
    if order is None:
        raise InvalidArgument(f"order_by {order_by} is not a ProcessOrder")
    procs = store.select(sel, include_gone=include_gone)
    procs.sort(key=order)

    def rows() -> Iterator[ProcessRow]:
        for p in procs[: limit or None]:
            yield _process_row(store, p, now, w)

    return ProcessList(covered(now, w, store.tiers), len(procs), rows())


def _process_row(store: Store, p: ProcState, now: float, w: float) -> ProcessRow:
    return ProcessRow(
        info=p.info,
        agent_id=p.key[0],
        node_name=store.agents[p.key[0]].identity.node_name,
        state=store.process_state(p, now),
        first_seen=p.first_seen,
        last_seen=p.last_seen,
        goroutines=p.goroutines,
        created=int(p.windows.total(now, w, CREATED)),
        exited=int(p.windows.total(now, w, EXITED)),
        orphans=p.orphans,
        panics=int(p.windows.total(now, w, PANICS)),
        drops=Counter(p.drops),
        gone_reason=p.gone_reason,
    )


@dataclass(frozen=True)
class LatencyWindow:
    """A traced function's latency over a window, merged over the selection."""

    function: str
    window_seconds: float
    processes: int  # processes that recorded it within the window
    histogram: Histogram | None  # None or empty: no calls in the window
    quantiles: tuple[tuple[float, float], ...] = field(default=())  # (quantile, seconds)
    # every call (the histogram holds the timed ones when timing was sampled), and the
    # error bound of that figure where agents estimated it
    calls: int = 0
    calls_error: float = 0.0

    @property
    def count(self) -> int:
        return self.histogram.count if self.histogram is not None else 0

    @property
    def mean_seconds(self) -> float:
        h = self.histogram
        return h.sum_seconds / h.count if h is not None and h.count else 0.0


def function_latency(
    store: Store,
    function: str,
    sel: Selection,
    now: float,
    *,
    window_seconds: float = 0.0,
    quantiles: Sequence[float] = (),
) -> LatencyWindow:
    """NotFound when nothing in the selection traces `function`."""
    if not function:
        raise InvalidArgument("function is required (a symbol, e.g. main.handle)")
    qs = list(quantiles) or list(DEFAULT_QUANTILES)
    for x in qs:
        if not 0 < x < 1:
            raise InvalidArgument(f"quantiles must be in (0, 1), got {x}")
    w = store.window(window_seconds)
    procs = store.select(sel)
    fn = function
    span_tiers = store.tiers
    if sel.agent_id or sel.pid:
        sources = [p.latency[fn] for p in procs if fn in p.latency]
        span_tiers = store.process_latency_tiers
    else:
        services = [store.services[sel.service]] if sel.service else store.services.values()
        sources = [svc.latency[fn] for svc in services if fn in svc.latency]
    if not sources:
        traced = sorted({f for p in procs for f in p.latency})
        listed = ", ".join(traced[:10]) + (" ..." if len(traced) > 10 else "")
        raise NotFound(
            f"no latency data for {fn!r} in the selection"
            + (f" (traced: {listed})" if traced else " (no function is traced there)")
        )
    merged: Histogram | None = None
    calls, calls_err2 = 0, 0.0
    for hw in sources:
        merged = hw.merged(now, w, merged)
        c, err = hw.calls(now, w)
        calls, calls_err2 = calls + c, calls_err2 + err * err  # independent errors
    span = covered(now, w, span_tiers)
    n = sum(1 for p in procs if fn in p.latency and p.latency[fn].last_record > now - span)
    values = merged.quantiles(qs) if merged is not None and merged.count else [0.0] * len(qs)
    return LatencyWindow(
        fn, span, n, merged, tuple(zip(qs, values, strict=True)), calls, calls_err2**0.5
    )


# --- creation sites, orphans, leak suspects --------------------------------------------


@dataclass(frozen=True)
class Ages:
    """Ages of a site's live goroutines (seconds), from its oldest process's view."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    max_is_lower_bound: bool = False  # the oldest's age counts from first sight


@dataclass(frozen=True)
class KeptGoroutine:
    """A goroutine an agent kept (with its stack) in its latest snapshot."""

    service: str
    agent_id: str
    pid: int
    goroutine: t.Goroutine
    observed: float  # when its process was last seen


@dataclass(frozen=True)
class SiteRow:
    """One creation site over the window, summed over the selection's processes."""

    service: str
    function: str
    go_statement: str
    creator: str
    live: int
    created: int
    exited: int
    growth_per_minute: float
    age: Ages
    wait_reasons: tuple[tuple[str, int], ...]  # most common first, at most 5
    orphans: int
    processes: int


@dataclass(frozen=True)
class SiteSummary:
    window_seconds: float
    processes: int
    goroutines: int
    created: int
    exited: int
    orphans: int
    rows: Iterator[SiteRow]  # most live first; computed as read


@dataclass(frozen=True)
class OrphanGroup:
    """Orphans of one creation site, over the selection's processes."""

    service: str
    function: str
    go_statement: str
    creator: str
    count: int
    oldest_age_seconds: float
    oldest_age_is_lower_bound: bool
    reason: str  # the dominant wait reason
    longest_blocked_seconds: float
    processes: int
    example: KeptGoroutine | None


@dataclass(frozen=True)
class LeakSuspect:
    service: str
    function: str
    go_statement: str
    creator: str
    live: int
    live_at_start: int
    growth_per_minute: float
    steady_fraction: float
    oldest_age_start_seconds: float
    oldest_age_seconds: float
    age: Ages
    wait_reasons: tuple[tuple[str, int], ...]
    processes: int
    example: KeptGoroutine | None


@dataclass(frozen=True)
class LeakSuspects:
    window_seconds: float
    rows: Iterator[LeakSuspect]  # fastest growing first; computed as read


@dataclass
class _SiteNow:
    """Point-in-time numbers of one site summed over processes."""

    creator: str = ""
    live: int = 0
    orphans: int = 0
    processes: int = 0
    age: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    age_lower_bound: bool = False  # the oldest's age counts from first sight
    wait: Counter[str] = field(default_factory=Counter)

    def add(self, s: SiteState) -> None:
        self.creator = self.creator or s.creator
        self.live += s.live
        self.orphans += s.orphans
        self.processes += 1 if s.live else 0
        ss = s.summary
        if ss is None:
            return
        a = ss.age
        if a.max_seconds > self.age[3]:
            self.age = (a.p50_seconds, a.p90_seconds, a.p99_seconds, a.max_seconds)
            self.age_lower_bound = a.max_is_lower_bound
        for w in ss.wait_reasons:
            self.wait[w.reason] += w.count

    def ages(self) -> Ages:
        return Ages(*self.age, max_is_lower_bound=self.age_lower_bound)

    def waits(self, n: int = 5) -> tuple[tuple[str, int], ...]:
        return tuple(self.wait.most_common(n))


def sites(
    store: Store, sel: Selection, now: float, *, window_seconds: float = 0.0, limit: int = 0
) -> SiteSummary:
    """Sites of the selection, most live first. Whole services are answered from
    their service-level windows; only the sites returned are looked up in each
    process (ages, wait reasons), so `limit` keeps a 20k-process summary cheap."""
    w = store.window(window_seconds)
    procs = store.select(sel)
    goroutines = created = exited = orphans = 0
    # (service, function, go statement) -> live, created, exited, where to look
    rows: dict[tuple[str, str, str], list[Any]] = {}
    if sel.agent_id or sel.pid:
        for p in procs:
            goroutines += p.goroutines
            created += int(p.windows.total(now, w, CREATED))
            exited += int(p.windows.total(now, w, EXITED))
            orphans += p.orphans
            for k, s in p.sites.items():
                row = rows.setdefault((p.service, *k), [0, 0.0, 0.0, []])
                row[0] += s.live
                row[1] += s.windows.total(now, w, CREATED)
                row[2] += s.windows.total(now, w, EXITED)
                row[3].append(p)
    else:
        services = [store.services[sel.service]] if sel.service else store.services.values()
        for svc in services:
            goroutines += svc.goroutines
            created += int(svc.windows.total(now, w, CREATED))
            exited += int(svc.windows.total(now, w, EXITED))
            for k, ss in svc.sites.items():
                rows[(svc.name, *k)] = [
                    ss.live,
                    ss.windows.total(now, w, CREATED),
                    ss.windows.total(now, w, EXITED),
                    svc,
                ]
        orphans = sum(p.orphans for p in procs)
    ranked = sorted(
        ((key, row) for key, row in rows.items() if row[0] or row[1] or row[2]),
        key=lambda kr: (-kr[1][0], -kr[1][1], kr[0]),
    )

    def site_rows() -> Iterator[SiteRow]:
        for (service, fn, stmt), (live, made, ended, where) in ranked[: limit or None]:
            yield _site_row(store, now, w, service, (fn, stmt), live, made, ended, where)

    return SiteSummary(
        covered(now, w, store.tiers), len(procs), goroutines, created, exited, orphans, site_rows()
    )


def _site_row(
    store: Store,
    now: float,
    w: float,
    service: str,
    k: SiteKey,
    live: int,
    created: float,
    exited: float,
    where: ServiceState | list[ProcState],
) -> SiteRow:
    acc = _SiteNow()
    if isinstance(where, ServiceState):
        acc.creator = where.sites[k].creator
        growth = detect.growth_per_minute(where.sites[k].windows.series(now, w, LIVE))
        for key in where.procs:
            s = store.procs[key].sites.get(k)
            if s is not None:
                acc.add(s)
    else:
        growth = 0.0
        for p in where:
            acc.add(p.sites[k])
            growth += detect.growth_per_minute(p.sites[k].windows.series(now, w, LIVE))
    return SiteRow(
        service=service,
        function=k[0],
        go_statement=k[1],
        creator=acc.creator,
        live=live,
        created=int(created),
        exited=int(exited),
        growth_per_minute=growth,
        age=acc.ages(),
        wait_reasons=acc.waits(),
        orphans=acc.orphans,
        processes=acc.processes,
    )


def _kept(p: ProcState, g: t.Goroutine) -> KeptGoroutine:
    return KeptGoroutine(p.service, p.key[0], p.key[1], g, p.last_seen)


def _example(procs: Iterable[ProcState], key: SiteKey, *, orphan: bool) -> KeptGoroutine | None:
    """The oldest kept goroutine of a site (of its orphans, with `orphan`)."""
    best: tuple[float, ProcState, t.Goroutine] | None = None
    for p in procs:
        for g in p.kept:
            if (
                (g.function, g.go_statement) == key
                and (g.orphan or not orphan)
                and (best is None or g.age_seconds > best[0])
            ):
                best = (g.age_seconds, p, g)
    return _kept(best[1], best[2]) if best else None


def orphans(
    store: Store, sel: Selection, now: float, *, min_age_seconds: float = 0.0
) -> Iterator[OrphanGroup]:
    """Orphan groups by creation site, most orphans first (computed as read)."""
    min_age = non_negative("min_age_seconds", min_age_seconds)
    store.check_selector(sel)
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key in store.with_orphans:
        p = store.procs[key]
        if not store.matches(p, sel):
            continue
        for fn, stmt in p.orphan_sites:
            s = p.sites[(fn, stmt)]
            if s.summary is None:
                continue
            gk = (p.service, fn, stmt)
            g = groups.get(gk)
            if g is None:
                g = groups[gk] = {
                    "creator": s.creator,
                    "count": 0,
                    "oldest": 0.0,
                    "oldest_lower_bound": False,
                    "blocked": 0.0,
                    "reasons": Counter(),
                    "procs": [],
                }
            o = s.summary.orphans
            g["count"] += s.orphans
            if o.oldest_age_seconds > g["oldest"]:
                g["oldest"] = o.oldest_age_seconds
                g["oldest_lower_bound"] = o.oldest_age_is_lower_bound
            g["blocked"] = max(g["blocked"], o.longest_blocked_seconds)
            g["reasons"][o.dominant_wait_reason] += s.orphans
            g["procs"].append(p)
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1]["count"], kv[0]))

    def rows() -> Iterator[OrphanGroup]:
        for (service, fn, stmt), g in ordered:
            if g["oldest"] < min_age:
                continue
            yield OrphanGroup(
                service=service,
                function=fn,
                go_statement=stmt,
                creator=g["creator"],
                count=g["count"],
                oldest_age_seconds=g["oldest"],
                oldest_age_is_lower_bound=g["oldest_lower_bound"],
                reason=g["reasons"].most_common(1)[0][0],
                longest_blocked_seconds=g["blocked"],
                processes=len(g["procs"]),
                example=_example(g["procs"], (fn, stmt), orphan=True),
            )

    return rows()


def leak_suspects(
    store: Store, sel: Selection, now: float, *, window_seconds: float = 0.0
) -> LeakSuspects:
    w = store.window(window_seconds, store.leak.window_seconds)
    procs = store.select(sel)
    by_site: dict[tuple[str, str, str], list[ProcState]] = {}
    for p in procs:
        for k in p.sites:
            by_site.setdefault((p.service, *k), []).append(p)
    found: list[tuple[detect.LeakVerdict, tuple[str, str, str]]] = []
    if sel.agent_id or sel.pid:
        # judge each selected process's site on its own series
        for key, ps in by_site.items():
            for p in ps:
                v = store.judge(p.sites[key[1:]].windows, now, w)
                if v is not None:
                    found.append((v, key))
    else:
        for key in by_site:
            ssite = store.services[key[0]].sites.get(key[1:])
            v = store.judge(ssite.windows, now, w) if ssite else None
            if v is not None:
                found.append((v, key))
    found.sort(key=lambda r: -r[0].growth_per_minute)

    def rows() -> Iterator[LeakSuspect]:
        for v, (service, fn, stmt) in found:
            acc = _SiteNow()
            for p in by_site[(service, fn, stmt)]:
                acc.add(p.sites[(fn, stmt)])
            yield LeakSuspect(
                service=service,
                function=fn,
                go_statement=stmt,
                creator=acc.creator,
                live=int(v.live),
                live_at_start=int(v.live_at_start),
                growth_per_minute=v.growth_per_minute,
                steady_fraction=v.steady_fraction,
                oldest_age_start_seconds=v.oldest_age_start,
                oldest_age_seconds=v.oldest_age,
                age=acc.ages(),
                wait_reasons=acc.waits(),
                processes=acc.processes,
                example=_example(by_site[(service, fn, stmt)], (fn, stmt), orphan=False),
            )

    return LeakSuspects(covered(now, w, store.tiers), rows())


# --- kept goroutines -------------------------------------------------------------------


@dataclass(frozen=True)
class GoroutineFilter:
    """Which kept goroutines a question is about (zero values: all)."""

    min_age_seconds: float = 0.0
    min_blocked_for_seconds: float = 0.0
    state: int = 0  # a goleash.v1.GoroutineState number
    orphans_only: bool = False
    site: str = ""  # a function or go statement (file:line, or its tail)

    def check(self) -> None:
        """InvalidArgument for a filter that cannot select anything sensibly."""
        non_negative("min_age_seconds", self.min_age_seconds)
        non_negative("min_blocked_for_seconds", self.min_blocked_for_seconds)
        if self.state not in t.GoroutineState.values():
            raise InvalidArgument(
                f"state {self.state} is not a GoroutineState "
                f"(one of {', '.join(t.GoroutineState.keys())})"
            )

    def admits(self, g: t.Goroutine) -> bool:
        return (
            g.age_seconds >= self.min_age_seconds
            and g.blocked_for_seconds >= self.min_blocked_for_seconds
            and (not self.state or g.state == self.state)
            and (not self.orphans_only or g.orphan)
            and (not self.site or site_is(g, self.site))
        )


def site_is(g: t.Goroutine | SiteRow | OrphanGroup, site: str) -> bool:
    """Whether `site` names the thing's function or go statement (or its tail)."""
    return g.function == site or g.go_statement == site or g.go_statement.endswith("/" + site)


def kept_goroutines(
    store: Store, sel: Selection, where: GoroutineFilter = GoroutineFilter()
) -> list[KeptGoroutine]:
    """The kept goroutines `where` admits, oldest first (`where` checked by the caller)."""
    found: list[tuple[float, tuple[str, int], int, ProcState, t.Goroutine]] = []
    for p in store.select(sel):
        for g in p.kept:
            if where.admits(g):
                found.append((-g.age_seconds, p.key, g.goid, p, g))
    found.sort(key=lambda r: r[:3])
    return [_kept(p, g) for _, _, _, p, g in found]
