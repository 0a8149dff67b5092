"""API responses as plain dicts (the CLI's --json) and as text tables for people."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.profiles import DUMP_SCHEMA, ProfileFrame, StackSample, goroutine_json


def _enum(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _ts(ns: int) -> float:
    return round(ns / 1e9, 3)


def _stack(r: q.GoroutineRecord | None) -> list[str]:
    if r is None or not r.HasField("goroutine"):
        return []
    return [f"{f.function} {f.file}:{f.line}" for f in r.goroutine.stack]


def process_dict(p: q.ProcessStatus, window: float) -> dict[str, Any]:
    return {
        "service": p.info.service,
        "pid": p.info.pid,
        "agent_id": p.agent_id,
        "node": p.node_name,
        "exe": p.info.exe,
        "go_version": p.info.go_version,
        "tracking": _enum(t.TrackingMode.Name(p.info.tracking_mode), "TRACKING_MODE_"),
        "tracking_reason": p.info.tracking_reason,
        "state": _enum(q.ProcessState.Name(p.state), "PROCESS_STATE_"),
        "goroutines": p.goroutines,
        "created": p.created,
        "exited": p.exited,
        "orphans": p.orphans,
        "panics": p.panics,
        "window_s": round(window, 1),
        "last_seen": _ts(p.last_seen_unix_nano),
        "drops": {d.reason: d.count for d in p.drops},
    }


def site_dict(s: q.SiteStats) -> dict[str, Any]:
    return {
        "service": s.service,
        "function": s.function,
        "go_statement": s.go_statement,
        "creator_function": s.creator_function,
        "live": s.live,
        "created": s.created,
        "exited": s.exited,
        "growth_per_min": round(s.growth_per_minute, 2),
        "oldest_age_s": round(s.age.max_seconds, 3),
        "oldest_age_is_lower_bound": s.age.max_is_lower_bound,
        "wait_reasons": {w.reason: w.count for w in s.wait_reasons},
        "orphans": s.orphans,
        "processes": s.processes,
    }


def orphan_dict(g: q.OrphanGroup) -> dict[str, Any]:
    return {
        "function": g.function,
        "go_statement": g.go_statement,
        "count": g.count,
        "oldest_age_s": round(g.oldest_age_seconds, 3),
        "oldest_age_is_lower_bound": g.oldest_age_is_lower_bound,
        "reason": g.reason,
        "service": g.service,
        "creator_function": g.creator_function,
        "longest_blocked_s": round(g.longest_blocked_seconds, 3),
        "processes": g.processes,
        "example_stack": _stack(g.example if g.HasField("example") else None),
    }


def agent_dict(a: q.AgentStatus) -> dict[str, Any]:
    return {
        "agent_id": a.identity.agent_id,
        "node": a.identity.node_name,
        "version": a.identity.version,
        "state": _enum(q.AgentState.Name(a.state), "AGENT_STATE_"),
        "processes": a.processes,
        "last_seen": _ts(a.last_seen_unix_nano),
        "last_sequence": a.last_sequence,
        "batches": a.batches,
        "duplicates": a.duplicates,
        "gaps": a.gaps,
        "interval_s": a.heartbeat.interval_seconds,
        "cpu_s": round(a.heartbeat.cpu_seconds, 3),
        "rss_bytes": a.heartbeat.rss_bytes,
        "drops": {d.reason: d.count for d in a.drops},
    }


def event_dict(e: t.Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "time": _ts(e.time_unix_nano),
        "kind": _enum(t.EventKind.Name(e.kind), "EVENT_KIND_"),
        "service": e.service,
        "agent_id": e.agent_id,
        "pid": e.pid,
        "message": e.message,
        "details": json_format.MessageToDict(e.details),
    }


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns; numbers right-aligned."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Agent-supplied names for a terminal: control characters (escape sequences,
    newlines, NUL) shown as \\xNN instead of being obeyed."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    return printable(str(v))


def _age(seconds: float, lower_bound: bool = False) -> str:
    """1.5h, 3.2m, 42s; ">= " first when the age counts from when goleash first saw
    the goroutine (it existed before tracing), so is only a lower bound."""
    if lower_bound:
        return ">= " + _age(seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.1f}m"
    return f"{seconds:.0f}s"


def processes_text(resp: q.ListProcessesResponse) -> str:
    if not resp.processes:
        return "no processes followed yet (is an agent connected? see `goleash agents`)\n"
    rows = [
        (
            d["service"],
            d["pid"],
            d["node"],
            d["go_version"],
            d["tracking"],
            d["state"],
            d["goroutines"],
            d["created"],
            d["exited"],
            d["orphans"],
            d["panics"],
        )
        for d in (process_dict(p, resp.window_seconds) for p in resp.processes)
    ]
    w = f"/{resp.window_seconds:.0f}s"
    header = (
        "SERVICE",
        "PID",
        "NODE",
        "GO",
        "TRACKING",
        "STATE",
        "GOROUTINES",
        "CREATED" + w,
        "EXITED" + w,
        "ORPHANS",
        "PANICS" + w,
    )
    return table(rows, header)


def orphans_text(resp: q.ListOrphansResponse) -> str:
    if not resp.groups:
        return "no orphaned goroutines\n"
    rows = [
        (
            g.service,
            g.count,
            _age(g.oldest_age_seconds, g.oldest_age_is_lower_bound),
            g.reason,
            g.function,
            g.go_statement,
        )
        for g in resp.groups
    ]
    return table(rows, ("SERVICE", "COUNT", "OLDEST", "REASON", "FUNCTION", "GO STATEMENT"))


def agents_text(resp: q.ListAgentsResponse) -> str:
    if not resp.agents:
        return "no agent has connected yet\n"
    rows = []
    for a in resp.agents:
        d = agent_dict(a)
        ago = max(time.time() - d["last_seen"], 0.0)
        rows.append(
            (
                d["agent_id"],
                d["node"],
                d["state"],
                d["processes"],
                _age(ago) + " ago",
                d["batches"],
                d["gaps"],
                sum(d["drops"].values()),
            )
        )
    return table(
        rows, ("AGENT", "NODE", "STATE", "PROCESSES", "LAST SEEN", "BATCHES", "GAPS", "DROPS")
    )


def event_line(e: t.Event) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.time_unix_nano / 1e9))
    kind = _enum(t.EventKind.Name(e.kind), "EVENT_KIND_")
    return f"{e.id:>6}  {when}  {kind:<22} {printable(e.message)}"


def top_frame(
    server: str,
    procs: q.ListProcessesResponse,
    summary: q.GetGoroutineSummaryResponse,
    agents: q.ListAgentsResponse,
    max_rows: int = 40,
) -> str:
    """One screen of `goleash top`: totals, busiest processes, creation sites."""
    connected = sum(1 for a in agents.agents if a.state == q.AGENT_STATE_CONNECTED)
    w = summary.window_seconds
    head = (
        f"goleash top  {server}  {time.strftime('%H:%M:%S')}  window {w:.0f}s\n"
        f"agents {connected}/{len(agents.agents)} connected  processes {summary.processes}  "
        f"goroutines {summary.goroutines}  created {summary.created}  exited {summary.exited}  "
        f"orphans {summary.orphans}\n\n"
    )
    budget = max(max_rows - 8, 6)
    running = sorted(procs.processes, key=lambda p: (-p.goroutines, p.info.service))
    prow = [
        (
            p.info.service,
            p.info.pid,
            p.node_name,
            p.goroutines,
            round(p.created * 60 / w, 1),
            round(p.exited * 60 / w, 1),
            p.orphans,
            p.panics,
            _enum(q.ProcessState.Name(p.state), "PROCESS_STATE_"),
        )
        for p in running[: budget // 2]
    ]
    ptab = table(
        prow,
        (
            "SERVICE",
            "PID",
            "NODE",
            "GOROUTINES",
            "CREATED/MIN",
            "EXITED/MIN",
            "ORPHANS",
            "PANICS",
            "STATE",
        ),
    )
    srow = [
        (
            s.service,
            s.live,
            round(s.growth_per_minute, 1),
            s.created,
            s.exited,
            s.orphans,
            _age(s.age.max_seconds, s.age.max_is_lower_bound),
            s.wait_reasons[0].reason if s.wait_reasons else "",
            s.function,
            s.go_statement.rsplit("/", 1)[-1],
        )
        for s in summary.sites[: budget - len(prow)]
    ]
    stab = table(
        srow,
        (
            "SERVICE",
            "LIVE",
            "GROWTH/MIN",
            "CREATED",
            "EXITED",
            "ORPHANS",
            "OLDEST",
            "WAIT",
            "FUNCTION",
            "GO STATEMENT",
        ),
    )
    return head + ptab + "\n" + stab


def top_json(
    procs: q.ListProcessesResponse,
    summary: q.GetGoroutineSummaryResponse,
    agents: q.ListAgentsResponse,
) -> dict[str, Any]:
    return {
        "time": round(time.time(), 3),
        "window_s": round(summary.window_seconds, 1),
        "agents": [agent_dict(a) for a in agents.agents],
        "totals": {
            "processes": summary.processes,
            "goroutines": summary.goroutines,
            "created": summary.created,
            "exited": summary.exited,
            "orphans": summary.orphans,
        },
        "processes": [process_dict(p, procs.window_seconds) for p in procs.processes],
        "sites": [site_dict(s) for s in summary.sites],
    }


_STATE_TEXT = {
    "RUNNABLE": "runnable",
    "RUNNING": "running",
    "SYSCALL": "syscall",
    "WAITING": "waiting",
    "IDLE": "idle",
    "DEAD": "dead",
    "COPYSTACK": "copystack",
    "PREEMPTED": "preempted",
}


def dump_text(records: Sequence[q.GoroutineRecord]) -> str:
    """Goroutines the agents kept, in the shape of runtime.Stack / pprof debug=2, one
    block per goroutine, each headed by where it lives (service, PID)."""
    out = []
    for r in records:
        g = r.goroutine
        status = g.wait_reason or _STATE_TEXT.get(
            _enum(t.GoroutineState.Name(g.state), "GOROUTINE_STATE_"), "unknown"
        )
        minutes = int(g.blocked_for_seconds // 60)
        if minutes >= 1:
            status += f", {minutes} minutes"
        p = printable
        lines = [
            f"# {p(r.service)} PID {r.pid} (agent {p(r.agent_id)})",
            f"goroutine {g.goid} [{p(status)}]:",
        ]
        for f in g.stack:
            lines += [f"{p(f.function)}(...)", f"\t{p(f.file)}:{f.line}"]
        if not g.stack:
            lines.append("\t(no stack kept for this goroutine)")
        if g.go_statement:
            by = g.created_by or g.function
            lines.append(
                f"created by {p(by)}" + (f" in goroutine {g.parent_goid}" if g.parent_goid else "")
            )
            lines.append(f"\t{p(g.go_statement)}")
        out.append("\n".join(lines))
    return "\n\n".join(out) + ("\n" if out else "")


def _state(g: t.Goroutine) -> str:
    name = _enum(t.GoroutineState.Name(g.state), "GOROUTINE_STATE_")
    return _STATE_TEXT.get(name.upper(), name)


def _record_frames(g: t.Goroutine) -> list[ProfileFrame]:
    return [ProfileFrame(f.function, f.file, f.line, f.pc) for f in g.stack]


def goroutine_dict(r: q.GoroutineRecord) -> dict[str, Any]:
    """A goroutine the agents kept, in `dump --json`'s one schema."""
    g = r.goroutine
    return goroutine_json(
        goid=g.goid,
        parent_goid=g.parent_goid,
        state=_state(g),
        wait_reason=g.wait_reason,
        blocked_seconds=g.blocked_for_seconds if g.blocked_for_seconds > 0 else None,
        age_seconds=g.age_seconds if g.age_seconds > 0 else None,
        age_is_lower_bound=g.age_is_lower_bound,
        start_function=g.function,
        created_by=g.created_by,
        go_statement=g.go_statement,
        orphan=g.orphan,
        system=None,
        frames=_record_frames(g),
        # agents keep at most a bounded number of frames and do not say whether
        # they cut: unknown
        stack_complete=None,
        stack_note=None,
        service=r.service,
        pid=r.pid,
        agent_id=r.agent_id,
    )


def dump_json(records: Sequence[q.GoroutineRecord]) -> dict[str, Any]:
    return {
        "schema": DUMP_SCHEMA,
        "source": "control-plane",
        "goroutines": [goroutine_dict(r) for r in records],
    }


def record_samples(records: Sequence[q.GoroutineRecord]) -> list[StackSample]:
    """Kept goroutines as profile samples (as probes.dump.dump_samples)."""
    out = []
    for r in records:
        g = r.goroutine
        frames = tuple(_record_frames(g)) or (ProfileFrame(g.function or "?"),)
        out.append(StackSample(frames, 1, (("state", g.wait_reason or _state(g)),)))
    return out


def latency_dict(resp: q.GetFunctionLatencyResponse) -> dict[str, Any]:
    """The shape `goleash latency --json` prints for a traced process, from a window."""
    row: dict[str, Any] = {"symbol": resp.function, "count": resp.count}
    for qv in resp.quantiles:
        key = {0.5: "p50_ns", 0.9: "p90_ns", 0.99: "p99_ns", 0.999: "p999_ns"}.get(
            round(qv.quantile, 4), f"q{qv.quantile:g}_ns"
        )
        row[key] = round(qv.value_seconds * 1e9)
    row["mean_ns"] = round(resp.mean_seconds * 1e9)
    row["window_s"] = resp.window_seconds
    row["processes"] = resp.processes
    return row


def latency_text(rows: Sequence[dict[str, Any]]) -> str:
    def ms(ns: Any) -> str:
        return "-" if ns is None else f"{ns / 1e6:.3f}"

    return table(
        [
            (
                r["symbol"],
                r["count"],
                ms(r.get("p50_ns")),
                ms(r.get("p90_ns")),
                ms(r.get("p99_ns")),
                ms(r.get("p999_ns")),
                r["processes"],
            )
            for r in rows
        ],
        ("FUNCTION", "CALLS", "p50 ms", "p90 ms", "p99 ms", "p999 ms", "PROCESSES"),
    )
