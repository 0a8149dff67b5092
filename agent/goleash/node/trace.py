"""`goleash trace --pid PID`: a live per-site goroutine summary of one process."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from goleash.errors import GoleashError
from goleash.gobin.errors import ProcessError
from goleash.node.tracker import ProcessSnapshot, ProcessTracker
from goleash.probes.budget import OverheadBudget
from goleash.probes.target import GoProcess
from goleash.signals import stop_on_signals


def _fmt_age(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f}ms"
    if v < 120:
        return f"{v:.1f}s"
    if v < 7200:
        return f"{v / 60:.1f}m"
    return f"{v / 3600:.1f}h"


def _created_note(snap: ProcessSnapshot) -> str:
    bound = snap.created_error_bound
    within = f" within {bound}" if bound is not None else ""
    return f"; created counted from the runtime's goid counter{within}"


def render(snap: ProcessSnapshot, elapsed_s: float, *, limit: int = 25) -> str:
    t = snap.totals
    lines = [
        f"PID {snap.pid} {snap.exe} ({snap.go_version})  {elapsed_s:.0f}s  mode: {snap.mode}"
        f"  overhead {snap.overhead_fraction:.2%} of a core (budget "
        + ("none" if snap.overhead_cap is None else f"{snap.overhead_cap:.0%}")
        + ")",
        f"live {t['live']}  created {t['created']}  exited {t['exited']}  "
        f"orphans {t['orphans']}  dropped "
        + (", ".join(f"{k}={v}" for k, v in snap.dropped.items() if v) or "none"),
    ]
    lines.append(
        f"lifetimes: {snap.lifetimes}"
        + ("" if snap.lifetimes != "off" else " (--lifetimes traps exits for them)")
        + ("" if snap.created_source == "probes" else _created_note(snap))
    )
    if snap.mode != "probes" or snap.lifetimes == "sampled":
        lines.append(f"note: {snap.mode_reason}")
    lines.append(
        f"{'LIVE':>7} {'CREATED':>8} {'EXITED':>8} {'AGE p50/p99/max':>20} {'ORPH':>5}  "
        f"{'BLOCKED ON':<22} FUNCTION  (GO STATEMENT)"
    )
    for s in snap.sites[:limit]:
        # ">=": the oldest was there before tracing saw it born (age since first seen)
        oldest = (">=" if s.age_max_lower_bound else "") + _fmt_age(s.age_max_s)
        ages = "/".join(_fmt_age(a) for a in (s.age_p50_s, s.age_p99_s)) + "/" + oldest
        reason = next(iter(s.wait_reasons), "-")
        lines.append(
            f"{s.live:>7} {s.created:>8} {s.exited + s.exited_unseen:>8} {ages:>20} "
            f"{s.orphans:>5}  {reason[:22]:<22} {s.function}  ({s.go_statement})"
        )
    if len(snap.sites) > limit:
        lines.append(f"... {len(snap.sites) - limit} more sites (--json for all)")
    return "\n".join(lines) + "\n"


def run_trace(
    pid: int,
    *,
    duration: float | None,
    interval: float,
    stacks: bool,
    as_json: bool,
    budget_fraction: float,
    max_live: int | None,
    lifetimes: bool = False,
    out: TextIO = sys.stdout,
    emit_json: Callable[[object], None] | None = None,
) -> int:
    if interval <= 0:
        raise GoleashError("--interval must be positive")
    proc = GoProcess.attach(pid)
    tracker = ProcessTracker(
        proc,
        stacks=stacks,
        budget=OverheadBudget(cpu_fraction=budget_fraction),
        max_live=max_live,
        lifetimes=lifetimes,
    )
    start = time.monotonic()
    last: ProcessSnapshot | None = None
    exit_note = ""
    with stop_on_signals() as stop:
        try:
            tracker.start()
            print(
                f"goleash: tracing PID {pid} ({proc.build_info.go_version}); "
                + ("Ctrl-C to stop" if duration is None else f"for {duration:g}s"),
                file=sys.stderr,
            )
            while not stop.is_set():
                deadline = time.monotonic() + interval
                if duration is not None:
                    deadline = min(deadline, start + duration)
                while not stop.is_set() and time.monotonic() < deadline:
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                try:
                    last = tracker.snapshot()
                except ProcessError:
                    last = tracker.final_snapshot()
                    exit_note = (
                        f"PID {pid} exited; final summary: the kernel's counts up to its exit, "
                        "live goroutines as last read"
                    )
                    if not as_json:
                        out.write(render(last, time.monotonic() - start))
                    break
                if not as_json:
                    out.write(render(last, time.monotonic() - start))
                    out.write("\n")
                    out.flush()
                if duration is not None and time.monotonic() - start >= duration:
                    break
        finally:
            tracker.close()  # detach every uprobe, whatever happened
    if exit_note:
        print(f"goleash: {exit_note}", file=sys.stderr)
    if as_json:
        obj = last.to_dict() if last else {"pid": pid, "sites": [], "totals": {}}
        obj["process_exited"] = bool(exit_note) or not os.path.exists(f"/proc/{pid}")
        if emit_json:
            emit_json(obj)
    return 0
