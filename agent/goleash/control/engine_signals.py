"""Reading a rule's signal for one service from the Store: the same numbers the query
API serves, or None when there is no data to judge on (the engine then holds)."""

from __future__ import annotations

import re
import statistics
from collections import deque
from dataclasses import dataclass

from goleash.control import queries
from goleash.control.queries import ProcessRow, site_is
from goleash.control.records import Selection
from goleash.control.rules import SignalSpec
from goleash.control.state import ControlError, Store

MIN_BASELINE_SAMPLES = 3

History = deque[tuple[float, float, bool]]  # (time, measured value, firing)


@dataclass(frozen=True)
class Reading:
    """One evaluation of a signal for a service."""

    value: float  # what thresholds compare against (a rise over baseline for those signals)
    raw: float  # the measured value itself
    baseline: float | None = None
    processes: int = 0
    note: str = ""


def running(store: Store, svc: str, window: float, now: float) -> list[ProcessRow] | None:
    """The service's processes, or None when any of them is stale (hold)."""
    try:
        found = queries.processes(store, Selection(service=svc), now, window_seconds=window)
        procs = list(found.rows)
    except ControlError:
        return None
    if not procs or any(not p.running for p in procs):
        return None
    return procs


def read(
    store: Store, sig: SignalSpec, svc: str, now: float, history: History | None = None
) -> Reading | None:
    """The signal's value for a service now; None when there is no data to judge on."""
    window = min(sig.window, store.retention)
    procs = running(store, svc, window, now)
    if procs is None:
        return None
    n = len(procs)
    if sig.kind == "goroutines":
        if sig.scope == "service":
            v = float(sum(p.goroutines for p in procs))
        elif sig.scope == "process":
            v = float(max(p.goroutines for p in procs))
        else:
            v = float(site_live(store, svc, sig.site, now))
        return Reading(v, v, processes=n)
    if sig.kind == "orphans":
        return _orphans(store, sig, svc, now, procs, history)
    if sig.kind == "leak_suspects":
        found = queries.leak_suspects(store, Selection(service=svc), now)
        v = float(sum(1 for _ in found.rows))
        return Reading(v, v, processes=n)
    if sig.kind == "panics":
        v = float(sum(p.panics for p in procs)) / window * 60.0
        return Reading(v, v, processes=n)
    return _function_latency(store, sig, svc, now, window, n, history)


def _orphans(
    store: Store,
    sig: SignalSpec,
    svc: str,
    now: float,
    procs: list[ProcessRow],
    history: History | None,
) -> Reading | None:
    n = len(procs)
    if sig.scope == "site":
        v = float(site_orphans(store, svc, sig.site, now))
    elif sig.scope == "process":
        v = float(max(p.orphans for p in procs))
    else:
        v = float(sum(p.orphans for p in procs))
    if sig.growth_per_minute is None:
        return Reading(v, v, processes=n)
    pts = [(t0, x) for t0, x, _ in (history or ()) if t0 >= now - sig.window]
    pts.append((now, v))
    span = pts[-1][0] - pts[0][0]
    if span < sig.window / 2:
        return None  # not enough history to tell a growth
    g = (pts[-1][1] - pts[0][1]) / span * 60.0
    return Reading(g, v, processes=n, note=f"{v:g} orphans now")


def _function_latency(
    store: Store,
    sig: SignalSpec,
    svc: str,
    now: float,
    window: float,
    n: int,
    history: History | None,
) -> Reading | None:
    fn = function(store, svc, sig.function)
    if fn is None:
        return None
    try:
        lat = queries.function_latency(
            store,
            fn,
            Selection(service=svc),
            now,
            window_seconds=window,
            quantiles=[sig.quantile],
        )
    except ControlError:
        return None
    if not lat.count:
        return None
    v = lat.quantiles[0][1]
    if sig.over_baseline is None:
        return Reading(v, v, processes=n, note=f"{lat.count} calls")
    # baseline: the median of this signal while it was not firing, so a sustained
    # jump does not become the new normal
    past = [
        x
        for t0, x, firing in (history or ())
        if not firing and now - sig.baseline_window <= t0 < now
    ]
    if len(past) < MIN_BASELINE_SAMPLES:
        # learning the baseline: keep the value, judge nothing yet
        if history is not None:
            history.append((now, v, False))
        return None
    base = statistics.median(past)
    return Reading(v - base, v, baseline=base, processes=n, note=f"{lat.count} calls")


def function(store: Store, svc: str, pattern: str) -> str | None:
    """The traced function a signal names: exactly, or by a glob (`*` any run, `(*`
    a pointer receiver), so one policy covers releases where net/http's HTTP/2
    framer has another package path (`*http2*Framer).ReadFrame`)."""
    s = store.services.get(svc)
    if s is None:
        return None
    if pattern in s.latency or "*" not in pattern.replace("(*", "("):
        return pattern
    rx = re.compile(
        "".join(
            r"\(\*" if pattern[i : i + 2] == "(*" else ".*" if ch == "*" else re.escape(ch)
            for i, ch in enumerate(pattern)
            if not (ch == "*" and i and pattern[i - 1] == "(")
        )
    )
    return next((f for f in sorted(s.latency) if rx.fullmatch(f)), None)


def site_live(store: Store, svc: str, site: str, now: float) -> int:
    found = queries.sites(store, Selection(service=svc), now)
    vals = [s.live for s in found.rows if not site or site_is(s, site)]
    return max(vals, default=0)


def site_orphans(store: Store, svc: str, site: str, now: float) -> int:
    found = queries.orphans(store, Selection(service=svc), now)
    vals = [g.count for g in found if not site or site_is(g, site)]
    return max(vals, default=0)


def kubernetes_ref(store: Store, svc: str) -> dict[str, str]:
    """The first Kubernetes workload of the service's processes (what actions patch)."""
    s = store.services.get(svc)
    for key in sorted(s.procs) if s else ():
        p = store.procs.get(key)
        k = p.info.kubernetes if p else None
        if k is not None and k.workload_name:
            return {
                "namespace": k.namespace,
                "workload_kind": k.workload_kind,
                "workload_name": k.workload_name,
                "container": k.container,
            }
    return {}
