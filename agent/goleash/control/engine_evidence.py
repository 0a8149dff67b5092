"""What a decision rests on, gathered from the Store for the event log, alerts and
commands: the reading, processes, busiest creation sites, orphans, leak suspects,
latency histograms, and on a degrade a flame graph of the creation stacks (SVG,
folded text, pprof) written to the report directory."""

from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goleash import profiles
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import flamegraph, queries
from goleash.control.actions import DEGRADE
from goleash.control.engine_signals import Reading
from goleash.control.histogram import bucket_bounds
from goleash.control.queries import SiteRow
from goleash.control.records import Selection
from goleash.control.rules import RuleSpec
from goleash.control.state import ControlError, Store

log = logging.getLogger("goleash.control.engine")

EVIDENCE_SITES = 10
KEPT_EXAMPLES = 1000  # the oldest kept goroutines a flame graph looks at for stacks


@dataclass(frozen=True)
class EvidenceSettings:
    report_dir: Path | None  # where flame graphs go (None: none written)
    external_url: str  # where the control plane is reachable (links in alerts)


def gather(
    store: Store,
    settings: EvidenceSettings,
    rule: RuleSpec,
    svc: str,
    now: float,
    reading: Reading | None,
    direction: str,
) -> dict[str, Any]:
    """What the decision rests on, for the event log, alerts and commands."""
    ev: dict[str, Any] = {"signal": rule.signal.describe()}
    if reading is not None:
        ev["value"] = reading.value
        ev["measured"] = reading.raw
        if reading.baseline is not None:
            ev["baseline"] = reading.baseline
        if reading.note:
            ev["note"] = reading.note
    sel = Selection(service=svc)
    try:
        _processes(store, svc, now, ev)
        summary = list(queries.sites(store, sel, now, limit=EVIDENCE_SITES).rows)
        ev["sites"] = [_site(s) for s in summary]
        _orphans_and_suspects(store, sel, now, ev)
        ev["latency"], text = latency(store, svc, now)
        if text:
            ev["latency_histogram_text"] = text
        if settings.external_url:
            ev["links"] = {"control_plane": settings.external_url}
        if direction == DEGRADE and settings.report_dir is not None:
            _flamegraph_files(store, settings, svc, summary, now, rule, ev)
    except ControlError as exc:  # the service vanished between reading and deciding
        ev["error"] = str(exc)
    return ev


def _processes(store: Store, svc: str, now: float, ev: dict[str, Any]) -> None:
    procs = list(queries.processes(store, Selection(service=svc), now).rows)
    ev["processes"] = [
        {
            "pid": p.info.pid,
            "agent_id": p.agent_id,
            "goroutines": p.goroutines,
            "orphans": p.orphans,
            "go_version": p.info.go_version,
        }
        for p in procs
    ]
    ev["goroutines"] = sum(p.goroutines for p in procs)


def _site(s: SiteRow) -> dict[str, Any]:
    return {
        "function": s.function,
        "go_statement": s.go_statement,
        "creator": s.creator,
        "live": s.live,
        "growth_per_minute": round(s.growth_per_minute, 1),
        "oldest_age_seconds": round(s.age.max, 1),
        "orphans": s.orphans,
        "wait_reason": s.wait_reasons[0][0] if s.wait_reasons else "",
    }


def _orphans_and_suspects(store: Store, sel: Selection, now: float, ev: dict[str, Any]) -> None:
    orphans = queries.orphans(store, sel, now)
    ev["orphans"] = [
        {
            "function": g.function,
            "go_statement": g.go_statement,
            "creator": g.creator,
            "count": g.count,
            "oldest_age_seconds": round(g.oldest_age_seconds, 1),
            "reason": g.reason,
        }
        for g in itertools.islice(orphans, EVIDENCE_SITES)
    ]
    suspects = queries.leak_suspects(store, sel, now)
    ev["leak_suspects"] = [
        {
            "function": s.function,
            "go_statement": s.go_statement,
            "live": s.live,
            "growth_per_minute": round(s.growth_per_minute, 1),
            "oldest_age_seconds": round(s.oldest_age_seconds, 1),
        }
        for s in itertools.islice(suspects.rows, EVIDENCE_SITES)
    ]


def _flamegraph_files(
    store: Store,
    settings: EvidenceSettings,
    svc: str,
    summary: list[SiteRow],
    now: float,
    rule: RuleSpec,
    ev: dict[str, Any],
) -> None:
    assert settings.report_dir is not None
    svg = flamegraph_file(store, settings.report_dir, svc, summary, now, rule)
    if not svg:
        return
    # the files, not their contents: alerts link to them
    files = {
        "flamegraph_svg": svg,
        "flamegraph_folded": str(Path(svg).with_suffix(".folded")),
        "goroutines_pprof": str(Path(svg).with_suffix(".pb.gz")),
    }
    ev.update(files)
    if settings.external_url:  # where the control plane serves report_dir
        base = settings.external_url.rstrip("/") + "/evidence/"
        ev["links"].update({k: base + Path(v).name for k, v in files.items()})


def latency(store: Store, svc: str, now: float) -> tuple[list[dict[str, Any]], str]:
    """Every traced function of the service: quantiles and histogram (data, text)."""
    s = store.services.get(svc)
    out, lines = [], []
    for fn in sorted(s.latency) if s else ():
        try:
            lat = queries.function_latency(store, fn, Selection(service=svc), now)
        except ControlError:
            continue
        h = lat.histogram
        if h is None or not h.count:
            continue
        rows = [(bucket_bounds(i, h.bits), h.buckets[i]) for i in sorted(h.buckets)]
        qs = {f"p{str(x)[2:].ljust(2, '0')}": v for x, v in lat.quantiles}
        out.append(
            {
                "function": fn,
                "window_seconds": lat.window_seconds,
                "count": lat.count,
                "mean_seconds": lat.mean_seconds,
                "quantiles_seconds": qs,
                "histogram": [[lo * 1e-9, hi * 1e-9, c] for (lo, hi), c in rows],
            }
        )
        lines.append(histogram_text(fn, lat.count, qs, rows))
    return out, "\n".join(lines)


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:80]


def flamegraph_file(
    store: Store,
    report_dir: Path,
    svc: str,
    summary: list[SiteRow],
    now: float,
    rule: RuleSpec,
) -> str:
    """Write the creation stacks as SVG, folded text and pprof; the SVG's path ("" when
    there is nothing to draw or the files cannot be written)."""
    sites = [(s.creator, s.go_statement, s.function, s.live) for s in summary]
    kept = queries.kept_goroutines(store, Selection(service=svc))[:KEPT_EXAMPLES]
    examples: dict[tuple[str, str], t.Goroutine] = {}
    for r in kept:  # oldest first: keep the oldest of each site
        examples.setdefault((r.goroutine.function, r.goroutine.go_statement), r.goroutine)
    stacks = flamegraph.creation_stacks(sites, examples)
    if not stacks:
        return ""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = report_dir / f"{stamp}-{safe_name(svc)}-{safe_name(rule.name)}.svg"
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        title = f"{svc}: goroutines by creation site ({rule.name})"
        path.write_text(flamegraph.render_svg(stacks, title))
        folded = path.with_suffix(".folded")
        folded.write_text("".join(flamegraph.folded_line(f, n) + "\n" for f, n in stacks.items()))
        path.with_suffix(".pb.gz").write_bytes(
            profiles.pprof_goroutine_profile(
                profiles.samples_from_folded(stacks), time_ns=int(now * 1e9), comments=[title]
            )
        )
    except OSError as exc:
        log.warning("cannot write the flame graph %s: %s", path, exc)
        return ""
    return str(path)


# --- text ------------------------------------------------------------------------------


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1e3:.0f}ms" if abs(v) < 10 else f"{v:.1f}s"
    if unit == "/min":
        return f"{v:.1f}/min"
    return f"{v:g}"


def dur(s: float) -> str:
    s = max(s, 0.0)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def histogram_text(
    fn: str, count: int, qs: dict[str, float], rows: list[tuple[tuple[int, int], int]]
) -> str:
    """A latency histogram as text, one bar per bucket (alerts, terminals)."""
    head = ", ".join(f"{k} {fmt(v, 's')}" for k, v in qs.items())
    lines = [f"{fn}: {count} calls, {head}"]
    top = max((c for _, c in rows), default=0)
    for (lo, hi), c in rows:
        bar = "#" * max(1, round(30 * c / top)) if top else ""
        lines.append(f"  {_ns(lo):>9} .. {_ns(hi):<9} {c:>8} {bar}")
    return "\n".join(lines)


def _ns(v: int) -> str:
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v}ns"
