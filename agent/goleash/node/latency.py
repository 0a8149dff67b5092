"""`goleash latency` and `goleash panics`: function latency and panics of one process."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from goleash.errors import GoleashError
from goleash.probes.budget import OverheadBudget
from goleash.probes.funclat import FuncLatencyProbes
from goleash.probes.funcrecord import FunctionLatency
from goleash.probes.funcs import FunctionIndex, Selection, resolve
from goleash.probes.panics import PanicProbes, PanicReading
from goleash.probes.target import GoProcess
from goleash.signals import stop_on_signals


def fmt_ns(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}ns"


def fmt_budget(budget: float) -> str:
    return "no" if math.isinf(budget) else f"the {budget:.0%}"


def render_calls(f: FunctionLatency) -> str:
    """All calls, and how sure that number is."""
    if f.calls_exact:
        return f"calls {f.calls}"
    err = f.calls_error
    return f"calls ~{f.calls}" + (f" (±{err:.0f})" if err is not None else " (not counted)")


def render_function(f: FunctionLatency, budget: float, width: int = 40) -> str:
    """One function's figures and a log2 histogram in µs, as BCC's funclatency draws it."""
    q = {p: f.quantile_ns(p) for p in (0.5, 0.9, 0.99, 0.999)}
    lines = [
        f.symbol,
        f"  {render_calls(f)}   timed {f.timed}   p50 {fmt_ns(q[0.5])}   "
        f"p90 {fmt_ns(q[0.9])}   p99 {fmt_ns(q[0.99])}   p999 {fmt_ns(q[0.999])}   "
        f"max {fmt_ns(f.hist.max_ns if f.timed else None)}",
    ]
    rows = f.hist.log2_rows()
    if rows:
        top = max(c for _, _, c in rows)
        lines.append(f"{'usecs':>10}{'':15}: count     distribution")
        for lo, hi, c in rows:
            stars = "*" * round(width * c / top) if top else ""
            lines.append(f"{lo:>10} -> {hi:<10} : {c:<8} |{stars:<{width}}|")
    if f.sampled:
        lines.append(
            f"  sampled: over {fmt_budget(budget)} CPU budget, calls were timed "
            f"{f.attached_fraction:.1%} of the time; quantiles from the {f.timed} timed calls"
            + (f"; {f.cut} calls still running when timing stopped, not timed" if f.cut else "")
        )
    if not f.calls_exact:
        lines.append(
            "  calls estimated: even counting calls costs more than the budget, so the "
            "entry probe was attached only part of the time"
        )
    if f.stale:
        lines.append(f"  not timed: {f.stale} calls that never returned (panic, Goexit)")
    if f.overflow:
        lines.append(f"  not timed: {f.overflow} calls nested too deep in traced calls")
    return "\n".join(lines) + "\n"


def _select(proc: GoProcess, patterns: Sequence[str]) -> Selection:
    index = FunctionIndex(proc.binary, proc.pclntab, proc.symbols)
    return resolve(index, patterns)


def run_latency(
    pid: int,
    patterns: Sequence[str],
    *,
    duration: float | None,
    interval: float,
    as_json: bool,
    budget_fraction: float,
    out: TextIO = sys.stdout,
    emit_json: Callable[[object], None] | None = None,
) -> int:
    _check_latency_args(interval, budget_fraction)
    proc = GoProcess.attach(pid)
    selection = _select(proc, patterns)
    budget = OverheadBudget(cpu_fraction=budget_fraction)
    probes = FuncLatencyProbes(proc, selection.functions, budget=budget)
    for line in selection.describe():
        print(f"goleash: {line}", file=sys.stderr)
    for note in probes.notes:
        print(f"goleash: note: {note}", file=sys.stderr)
    start = time.monotonic()
    totals, exited = _time_calls(proc, selection, probes, duration=duration, interval=interval)
    elapsed = time.monotonic() - start
    if exited:
        print(f"goleash: PID {pid} exited; figures up to its exit", file=sys.stderr)
    funcs = list(totals.values())
    if as_json:
        obj = {
            "pid": pid,
            "go_version": proc.go_version,
            "duration_s": round(elapsed, 3),
            "budget": None if math.isinf(budget_fraction) else budget_fraction,
            "process_exited": exited,
            "resolved": [
                {"pattern": r.pattern, "how": r.how, "symbols": list(r.symbols)}
                for r in selection.resolutions
            ],
            "functions": [f.to_dict() for f in funcs],
        }
        (emit_json or _print_json)(obj)
        return 0
    out.write(f"\nPID {pid} ({proc.go_version}), {elapsed:.1f}s\n\n")
    for f in funcs:
        out.write(render_function(f, budget_fraction))
        out.write("\n")
    return 0


def _check_latency_args(interval: float, budget_fraction: float) -> None:
    if interval <= 0:
        raise GoleashError("--interval must be positive")
    if budget_fraction <= 0:
        raise GoleashError(
            "--budget 0 allows the probes no cost at all, so nothing can be counted or "
            "timed; give a share of a core (e.g. 0.01) or 'none' for no limit"
        )


def _time_calls(
    proc: GoProcess,
    selection: Selection,
    probes: FuncLatencyProbes,
    *,
    duration: float | None,
    interval: float,
) -> tuple[dict[str, FunctionLatency], bool]:
    """Attach, add up every interval until the duration, a signal or the process's exit,
    detach. Returns the totals per symbol and whether the process exited."""
    err = sys.stderr
    totals = {f.symbol: FunctionLatency(f.symbol) for f in selection.functions}
    start = time.monotonic()
    exited = False
    with stop_on_signals() as stop:
        try:
            probes.attach()
            print(
                f"goleash: tracing {len(selection.functions)} function(s) in PID {proc.pid} "
                f"({proc.go_version}); "
                + ("Ctrl-C to stop" if duration is None else f"for {duration:g}s"),
                file=err,
            )
            while not stop.is_set():
                left = None if duration is None else duration - (time.monotonic() - start)
                if left is not None and left <= 0.01:
                    break
                reading = probes.run_interval(interval if left is None else min(interval, left))
                for r in reading.functions:
                    totals[r.symbol] = totals[r.symbol] + r
                if not proc.alive():
                    exited = True
                    break
            # What returned since the last interval (a Ctrl-C may come at any time).
            for r in probes.flush().functions:
                totals[r.symbol] = totals[r.symbol] + r
            evicted = probes.evicted()
            if evicted:
                print(
                    f"goleash: note: the in-flight table was full and dropped the calls of "
                    f"{evicted} goroutines; long calls are the likelier victims, so the "
                    "quantiles may lean short",
                    file=err,
                )
        finally:
            probes.close()  # detach every uprobe, whatever happened
    return totals, exited


def render_panics(r: PanicReading) -> str:
    lines = [f"{r.total} panics (recovered or not)"]
    if r.sites:
        lines.append(f"{'COUNT':>7}  {'FUNCTION':<48} WHERE")
        for s in sorted(r.sites, key=lambda s: -s.count):
            where = f"{s.file}:{s.line}" if s.file else "?"
            lines.append(f"{s.count:>7}  {s.function:<48} {where}")
    return "\n".join(lines) + "\n"


def run_panics(
    pid: int,
    *,
    duration: float | None,
    as_json: bool,
    out: TextIO = sys.stdout,
    emit_json: Callable[[object], None] | None = None,
) -> int:
    proc = GoProcess.attach(pid)
    probes = PanicProbes(proc)
    start = time.monotonic()
    exited = False
    with stop_on_signals() as stop:
        try:
            probes.attach()
            print(
                f"goleash: counting panics in PID {pid} ({proc.go_version}); "
                + ("Ctrl-C to stop" if duration is None else f"for {duration:g}s"),
                file=sys.stderr,
            )
            while not stop.is_set():
                if duration is not None and time.monotonic() - start >= duration:
                    break
                if not proc.alive():
                    exited = True  # an unrecovered panic ends it: its count is kept
                    break
                time.sleep(0.1)
            reading = probes.read()
        finally:
            probes.close()
    elapsed = time.monotonic() - start
    if exited:
        print(f"goleash: PID {pid} exited; counts up to its exit", file=sys.stderr)
    if as_json:
        obj = {
            "pid": pid,
            "go_version": proc.go_version,
            "duration_s": round(elapsed, 3),
            "process_exited": exited,
            **reading.to_dict(),
        }
        (emit_json or _print_json)(obj)
        return 0
    out.write(f"PID {pid} ({proc.go_version}), {elapsed:.1f}s: " + render_panics(reading))
    return 0


def _print_json(obj: object) -> None:
    import json

    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
