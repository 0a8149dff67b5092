"""`goleash record --service NS/NAME --window 10m` and `goleash diff --service A
--against B`: a recording (goleash.recdiff's format) composed from the
control plane's existing queries, so no agent needs to be reached directly and no
new RPC is needed:

- ListProcesses: Go versions and main modules of the service's processes (the
  control plane keeps no dependency list: `deps` stays empty, the diff says so by
  showing no module rows);
- GetGoroutineSummary: per creation site the live count, created in the window,
  growth per minute, ages and wait reasons (no time series: the start of the window
  is estimated from the growth);
- GetFunctionLatency, once per --func: count and p50/p90/p99 over the window.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.recdiff import RECORD_KIND, RECORD_VERSION

if TYPE_CHECKING:
    from goleash.control.client import ControlClient


def _build(processes: Sequence[q.ProcessStatus]) -> dict[str, Any]:
    """The most common Go version and module; a mix is named in settings."""
    versions = Counter(p.info.go_version for p in processes if p.info.go_version)
    modules = Counter(p.info.module_path for p in processes if p.info.module_path)
    settings: dict[str, str] = {}
    if len(versions) > 1:
        settings["go versions (mixed)"] = ",".join(sorted(versions))
    return {
        "go_version": versions.most_common(1)[0][0] if versions else None,
        "main_module": modules.most_common(1)[0][0] if modules else None,
        "main_package": None,
        "deps": {},
        "settings": settings,
    }


def _ns(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e9)


def record_service(
    client: ControlClient, service: str, *, window_s: float, funcs: Sequence[str] = ()
) -> dict[str, Any]:
    sel = q.ProcessSelector(service=service)
    procs = client.call(
        "ListProcesses", q.ListProcessesRequest(selector=sel, window_seconds=window_s)
    )
    summary = client.call(
        "GetGoroutineSummary",
        q.GetGoroutineSummaryRequest(selector=sel, window_seconds=window_s),
    )
    window = summary.window_seconds or window_s
    sites = []
    for s in summary.sites:
        if s.service and s.service != service:
            continue
        growth = float(s.growth_per_minute)
        start = max(0, round(s.live - growth * window / 60.0))
        reasons = {w.reason: int(w.count) for w in s.wait_reasons}
        sites.append(
            {
                "function": s.function,
                "go_statement": s.go_statement,
                "created_by": s.creator_function,
                "created": int(s.created),
                "exited": int(s.exited),
                "live_start": start,
                "live_end": int(s.live),
                "live_max": int(s.live),
                "growth_per_min": round(growth, 3),
                "samples": [],
                "age_p50_s": s.age.p50_seconds,
                "age_p99_s": s.age.p99_seconds,
                "age_max_s": s.age.max_seconds,
                "wait_reason": max(reasons, key=lambda k: reasons[k]) if reasons else "",
                "wait_reasons": reasons,
                "stacks": {},
            }
        )
    functions = []
    for fn in funcs:
        lat = client.call(
            "GetFunctionLatency",
            q.GetFunctionLatencyRequest(
                function=fn, selector=sel, window_seconds=window_s, quantiles=[0.5, 0.9, 0.99]
            ),
        )
        qv = {round(v.quantile, 3): v.value_seconds for v in lat.quantiles}
        timed = bool(lat.count)
        p50, p90, p99 = (_ns(qv.get(x)) if timed else None for x in (0.5, 0.9, 0.99))
        functions.append(
            {
                "symbol": fn,
                "count": int(lat.count),
                "p50_ns": p50,
                "p90_ns": p90,
                "p99_ns": p99,
                "max_ns": None,
                "log2_us": [],
            }
        )
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "service": service,
        "recorded_at": time.time(),
        "duration_s": window,
        "processes": len(procs.processes),
        "build": _build(procs.processes),
        "totals": {"live_end": int(summary.goroutines), "created": int(summary.created)},
        "sites": sites,
        "functions": functions,
        "source": "control plane",
    }
