"""`goleash record --pid P --duration S -o before.json`: what a process does over a
window, in a file another recording can be compared with (`goleash diff`).

A recording holds the build (Go version, main module, every dependency's version),
per creation site the goroutines created, live count over time, growth per minute,
age distribution, dominant wait reason and a few stacks, and the latency histogram
of each function asked for with --func. The format is plain JSON
(`goleash.recdiff` reads it; see RECORD_KIND).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from goleash.errors import GoleashError
from goleash.gobin.errors import ProcessError
from goleash.node.checktrace import started_function
from goleash.node.latency import _select
from goleash.node.tracker import ProcessSnapshot, ProcessTracker, SiteSummary
from goleash.probes.budget import OverheadBudget
from goleash.probes.creation import site_at
from goleash.probes.funclat import FuncLatencyProbes
from goleash.probes.funcrecord import FunctionLatency
from goleash.probes.inventory import Goroutine
from goleash.probes.stacks import walk_stacks
from goleash.probes.target import GoProcess
from goleash.recdiff import RECORD_KIND, RECORD_VERSION, growth_per_minute

MAX_SITES = 500  # sites written, most live first
STACKS_PER_SITE = 5
MAX_SAMPLES = 2000


class RecordError(GoleashError):
    """Bad arguments for `goleash record`."""


def _build(proc: GoProcess) -> dict[str, Any]:
    info = proc.build_info
    return {
        "go_version": info.go_version,
        "main_module": info.main_module,
        "main_package": info.main_package,
        "deps": dict(sorted(info.deps.items())),
        "settings": dict(sorted(info.settings.items())),
    }


def _function_dict(f: FunctionLatency) -> dict[str, Any]:
    def q(p: float) -> float | None:
        v = f.quantile_ns(p)
        return None if v is None else round(v)

    return {
        "symbol": f.symbol,
        "count": f.count,
        "p50_ns": q(0.5),
        "p90_ns": q(0.9),
        "p99_ns": q(0.99),
        "max_ns": f.hist.max_ns if f.count else None,
        "log2_us": [[lo, hi, c] for lo, hi, c in f.hist.log2_rows()],
    }


Series = list[tuple[float, int]]  # (seconds into the window, live goroutines)
SiteKey = tuple[str, str]  # (function, go statement)


@dataclass
class _Window:
    """What the sampling loop saw: the last snapshot and the live count per site."""

    last: ProcessSnapshot | None = None
    samples: dict[SiteKey, Series] = field(default_factory=dict)
    exited: bool = False
    elapsed: float = 0.0


def record(
    pid: int,
    *,
    duration: float,
    interval: float,
    funcs: Sequence[str],
    budget_fraction: float = 0.05,
) -> dict[str, Any]:
    if duration <= 0 or interval <= 0:
        raise RecordError("--duration and --interval must be positive")
    if interval > duration:
        interval = duration
    proc = GoProcess.attach(pid)
    tracker = ProcessTracker(proc, budget=OverheadBudget(cpu_fraction=budget_fraction))
    lat: FuncLatencyProbes | None = None
    totals: dict[str, FunctionLatency] = {}
    resolved: list[dict[str, Any]] = []
    if funcs:
        sel = _select(proc, funcs)
        resolved = [
            {"pattern": r.pattern, "how": r.how, "symbols": list(r.symbols)}
            for r in sel.resolutions
        ]
        lat = FuncLatencyProbes(
            proc, sel.functions, budget=OverheadBudget(cpu_fraction=budget_fraction)
        )
        totals = {f.symbol: FunctionLatency(f.symbol) for f in sel.functions}
    window = _sample(tracker, lat, totals, duration=duration, interval=interval)
    last = window.last
    if last is None:
        raise ProcessError(f"PID {pid} exited before anything was recorded")
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "pid": pid,
        "exe": proc.exe_name,
        "recorded_at": time.time(),
        "duration_s": round(window.elapsed, 3),
        "interval_s": interval,
        "process_exited": window.exited,
        "build": _build(proc),
        "totals": {
            "live_end": last.totals.get("live", 0),
            "created": last.totals.get("created", 0),
        },
        "sites": _sites(proc, last, window),
        "functions": [_function_dict(f) for f in totals.values()],
        "resolved": resolved,
        "mode": last.mode,
    }


def _sample(
    tracker: ProcessTracker,
    lat: FuncLatencyProbes | None,
    totals: dict[str, FunctionLatency],
    *,
    duration: float,
    interval: float,
) -> _Window:
    """Attach, snapshot every interval (adding function latency into `totals` between
    snapshots) until the duration ends or the process exits, detach."""
    w = _Window()
    try:
        tracker.start()
        if lat is not None:
            lat.attach()
        start = time.monotonic()  # the window starts once everything is attached
        while True:
            t = time.monotonic() - start
            try:
                w.last = tracker.snapshot()
            except ProcessError:
                w.exited = True
                break
            for s in w.last.sites:
                series = w.samples.setdefault((s.function, s.go_statement), [])
                if len(series) < MAX_SAMPLES:
                    series.append((round(t, 3), s.live))
            left = duration - (time.monotonic() - start)
            if left <= 0.01:
                break
            wait = min(interval, left)
            if lat is not None:
                for r in lat.run_interval(wait).functions:
                    totals[r.symbol] = totals[r.symbol] + r
            else:
                time.sleep(wait)
        if lat is not None and not w.exited:
            for r in lat.flush().functions:
                totals[r.symbol] = totals[r.symbol] + r
    finally:
        if lat is not None:
            lat.close()
        tracker.close()
    w.elapsed = time.monotonic() - start if w.last is not None else 0.0
    return w


def _sites(proc: GoProcess, last: ProcessSnapshot, window: _Window) -> list[dict[str, Any]]:
    """The most live sites of the last snapshot, each with its series and a few stacks."""
    # A few stacks per site from the last inventory, for people (flame graphs).
    by_site: dict[SiteKey, list[Goroutine]] = {}
    for g in last.goroutines:
        site = site_at(proc, g.gopc, g.startpc)
        lst = by_site.setdefault((site.function, site.go_statement), [])
        if len(lst) < STACKS_PER_SITE and g.status != "running":
            lst.append(g)
    picked = [g for gs in by_site.values() for g in gs]
    stacks = walk_stacks(proc, picked, 32) if not window.exited else {}
    sites = []
    for s in sorted(last.sites, key=lambda s: -s.live)[:MAX_SITES]:
        key = (s.function, s.go_statement)
        folded: Counter[str] = Counter()
        for g in by_site.get(key, []):
            st = stacks.get(g.goid)
            if st is not None and st.frames:
                folded[";".join(fr.function for fr in reversed(st.frames))] += 1
        sites.append(_site_dict(proc, s, window.samples.get(key, []), folded))
    return sites


def _site_dict(
    proc: GoProcess, s: SiteSummary, series: Series, folded: Counter[str]
) -> dict[str, Any]:
    created_by = site_at(proc, s.gopc, s.startpc).created_by if s.gopc else ""
    reasons = s.wait_reasons or {}
    return {
        "function": started_function(proc, s.function, []),
        "go_statement": s.go_statement,
        "created_by": created_by,
        "created": s.created,
        "exited": s.exited + s.exited_unseen,
        "live_start": series[0][1] if series else s.live,
        "live_end": s.live,
        "live_max": max((v for _, v in series), default=s.live),
        "growth_per_min": round(growth_per_minute(series), 3),
        "samples": series,
        "age_p50_s": s.age_p50_s,
        "age_p99_s": s.age_p99_s,
        "age_max_s": s.age_max_s,
        "wait_reason": max(reasons, key=lambda k: reasons[k]) if reasons else "",
        "wait_reasons": dict(reasons),
        "stacks": dict(folded),
    }


def write_record(rec: dict[str, Any], path: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror}") from None
