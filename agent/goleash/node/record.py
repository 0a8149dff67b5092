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
from typing import Any

from goleash.errors import GoleashError
from goleash.gobin.errors import ProcessError
from goleash.node.checktrace import started_function
from goleash.node.latency import _select
from goleash.node.tracker import ProcessTracker
from goleash.probes.budget import OverheadBudget
from goleash.probes.funclat import FuncLatencyProbes, FunctionLatency
from goleash.probes.inventory import site_at
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
    samples: dict[tuple[str, str], list[tuple[float, int]]] = {}
    exited = False
    last = None
    try:
        tracker.start()
        if lat is not None:
            lat.attach()
        start = time.monotonic()  # the window starts once everything is attached
        while True:
            t = time.monotonic() - start
            try:
                last = tracker.snapshot()
            except ProcessError:
                exited = True
                break
            for s in last.sites:
                series = samples.setdefault((s.function, s.go_statement), [])
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
        if lat is not None and not exited:
            for r in lat.flush().functions:
                totals[r.symbol] = totals[r.symbol] + r
    finally:
        if lat is not None:
            lat.close()
        tracker.close()
    elapsed = time.monotonic() - start if last is not None else 0.0
    if last is None:
        raise ProcessError(f"PID {pid} exited before anything was recorded")
    # A few stacks per site from the last inventory, for people (flame graphs).
    by_site: dict[tuple[str, str], list[Any]] = {}
    for g in last.goroutines:
        site = site_at(proc, g.gopc, g.startpc)
        lst = by_site.setdefault((site.function, site.go_statement), [])
        if len(lst) < STACKS_PER_SITE and g.status != "running":
            lst.append(g)
    picked = [g for gs in by_site.values() for g in gs]
    stacks = walk_stacks(proc, picked, 32) if not exited else {}
    sites = []
    for s in sorted(last.sites, key=lambda s: -s.live)[:MAX_SITES]:
        series = samples.get((s.function, s.go_statement), [])
        function = started_function(proc, s.function, [])
        folded: Counter[str] = Counter()
        for g in by_site.get((s.function, s.go_statement), []):
            st = stacks.get(g.goid)
            if st is not None and st.frames:
                folded[";".join(fr.function for fr in reversed(st.frames))] += 1
        created_by = site_at(proc, s.gopc, s.startpc).created_by if s.gopc else ""
        reasons = s.wait_reasons or {}
        sites.append(
            {
                "function": function,
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
        )
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "pid": pid,
        "exe": proc.exe_name,
        "recorded_at": time.time(),
        "duration_s": round(elapsed, 3),
        "interval_s": interval,
        "process_exited": exited,
        "build": _build(proc),
        "totals": {
            "live_end": last.totals.get("live", 0),
            "created": last.totals.get("created", 0),
        },
        "sites": sites,
        "functions": [_function_dict(f) for f in totals.values()],
        "resolved": resolved,
        "mode": last.mode,
    }


def write_record(rec: dict[str, Any], path: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc.strerror}") from None
