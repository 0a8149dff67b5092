"""`goleash diff before.json after.json`: what changed between two recordings.

Pure Python over two `goleash record` reports (plain dicts), so the CLI and the
control plane compare the same way. One table per concern, each row with a verdict
and its evidence:

- build: Go version, main module, every dependency whose version changed, build
  settings;
- goroutine sites: new, gone, now growing, live count changed beyond noise. Sites
  are matched by the started function and the function holding the `go` statement,
  not the line, so an edit above a `go` statement does not make a site "new";
- functions: p50/p99 moved beyond noise.

`--fail-on` thresholds turn findings into exit 1 (CI, canary analysis).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from goleash.errors import GoleashError

RECORD_KIND = "goleash-record"
RECORD_VERSION = 1

# Noise floors: below them a difference is not a finding.
GROWTH_MIN_PER_MIN = 6.0  # live goroutines per minute
GROWTH_MIN_RISE = 5  # and at least this many more at the end than at the start
LIVE_CHANGE_RATIO = 2.0  # live count x2 ...
LIVE_CHANGE_MIN = 10  # ... and at least this many goroutines apart
LATENCY_CHANGE = 0.20  # +-20 % ...
LATENCY_MIN_NS = 200_000  # ... and at least 0.2 ms apart
LATENCY_MIN_CALLS = 20
# A p99 is judged only with enough calls past it: with 130 calls it is the second
# slowest one, and one scheduling hiccup on a busy machine moves it 10x.
P99_MIN_CALLS = 500


class DiffError(GoleashError):
    """Bad input for `goleash diff` (exit 2)."""


def growth_per_minute(series: list[tuple[float, int]] | list[list[float]]) -> float:
    """Least-squares slope of live count over time, per minute (0 with < 2 samples)."""
    pts = [(float(t), float(v)) for t, v in series]
    if len(pts) < 2:
        return 0.0
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mv = sum(v for _, v in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var <= 0:
        return 0.0
    cov = sum((t - mt) * (v - mv) for t, v in pts)
    return cov / var * 60.0


def growing(site: dict[str, Any]) -> bool:
    return (
        float(site.get("growth_per_min", 0.0)) >= GROWTH_MIN_PER_MIN
        and int(site.get("live_end", 0)) - int(site.get("live_start", 0)) >= GROWTH_MIN_RISE
    )


@dataclass
class Row:
    concern: str  # "build" | "site" | "function"
    subject: str
    verdict: str
    before: str
    after: str
    evidence: str
    flagged: bool  # a finding worth a person's attention
    tags: list[str] = field(default_factory=list)  # what --fail-on can match
    stacks: dict[str, int] = field(default_factory=dict)  # folded, for the HTML report


@dataclass
class Diff:
    before: str
    after: str
    build: list[Row]
    sites: list[Row]
    functions: list[Row]
    failed: list[str] = field(default_factory=list)  # the --fail-on rules that matched

    @property
    def rows(self) -> list[Row]:
        return self.build + self.sites + self.functions

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after": self.after,
            "build": [asdict(r) for r in self.build],
            "sites": [asdict(r) for r in self.sites],
            "functions": [asdict(r) for r in self.functions],
            "flagged": sum(1 for r in self.rows if r.flagged),
            "failed": self.failed,
        }


def check_record(rec: Any, name: str) -> dict[str, Any]:
    if not isinstance(rec, dict) or rec.get("kind") != RECORD_KIND:
        raise DiffError(f"{name}: not a `goleash record` report")
    if rec.get("version") != RECORD_VERSION:
        raise DiffError(f"{name}: record format {rec.get('version')!r}, expected {RECORD_VERSION}")
    for key in ("build", "sites", "functions"):
        if key not in rec:
            raise DiffError(f"{name}: no {key!r} in the report")
    return rec


# --- build ------------------------------------------------------------------------------


def _build_rows(b: dict[str, Any], a: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []

    def add(subject: str, x: Any, y: Any, tag: str) -> None:
        if x != y:
            verdict = "added" if x is None else "removed" if y is None else "changed"
            rows.append(
                Row(
                    "build",
                    subject,
                    verdict,
                    str(x or "-"),
                    str(y or "-"),
                    _change(x, y),
                    True,
                    [tag],
                )
            )

    add("Go version", b.get("go_version"), a.get("go_version"), "go-version")
    add("main module", b.get("main_module"), a.get("main_module"), "build")
    add("main package", b.get("main_package"), a.get("main_package"), "build")
    bd, ad = b.get("deps") or {}, a.get("deps") or {}
    for mod in sorted(set(bd) | set(ad)):
        add(f"module {mod}", bd.get(mod), ad.get(mod), "module")
    bs, as_ = b.get("settings") or {}, a.get("settings") or {}
    for key in sorted(set(bs) | set(as_)):
        add(f"setting {key}", bs.get(key), as_.get(key), "build")
    return rows


def _change(x: Any, y: Any) -> str:
    """ "a -> b"; for k=v lists (DefaultGODEBUG, -tags) only the items that differ."""
    if isinstance(x, str) and isinstance(y, str) and "," in x + y:
        xs, ys = set(x.split(",")), set(y.split(","))
        parts = [f"-{i}" for i in sorted(xs - ys)] + [f"+{i}" for i in sorted(ys - xs)]
        return " ".join(parts)
    return f"{x} -> {y}"


# --- goroutine sites --------------------------------------------------------------------


def _line(site: dict[str, Any]) -> int:
    m = re.search(r":(\d+)$", str(site.get("go_statement", "")))
    return int(m.group(1)) if m else 0


def _short_stmt(stmt: str) -> str:
    return stmt.rsplit("/", 1)[-1] if stmt else "-"


def match_sites(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Pairs (before, after) matched by (function, created_by); within one such key
    the sites pair up in line order (a creator with two `go f()` statements)."""

    def key(s: dict[str, Any]) -> tuple[str, str]:
        return (str(s.get("function", "")), str(s.get("created_by", "")))

    groups: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
    for s in before:
        groups.setdefault(key(s), ([], []))[0].append(s)
    for s in after:
        groups.setdefault(key(s), ([], []))[1].append(s)
    out: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []
    for _k, (bs, as_) in sorted(groups.items()):
        bs.sort(key=_line)
        as_.sort(key=_line)
        for i in range(max(len(bs), len(as_))):
            out.append((bs[i] if i < len(bs) else None, as_[i] if i < len(as_) else None))
    return out


def _site_evidence(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    age = s.get("age_max_s")
    age_txt = f", oldest {age:.1f}s" if isinstance(age, (int, float)) else ""
    reason = f", mostly {s['wait_reason']}" if s.get("wait_reason") else ""
    return (
        f"live {s.get('live_start', 0)}->{s.get('live_end', 0)} "
        f"({float(s.get('growth_per_min', 0)):+.1f}/min), created {s.get('created', 0)}"
        f"{age_txt}{reason}"
    )


def _site_rows(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for b, a in match_sites(before, after):
        s = a or b
        assert s is not None
        subject = f"{s.get('function', '?')} ({_short_stmt(str(s.get('go_statement', '')))})"
        tags: list[str] = []
        if b is None:
            assert a is not None
            if growing(a):
                verdict, tags = "new, growing", ["growth", "new-site"]
            else:
                verdict, tags = "new", ["new-site"]
            flagged = growing(a) or int(a.get("live_end", 0)) >= LIVE_CHANGE_MIN
        elif a is None:
            verdict, flagged = "gone", False
        elif growing(a) and not growing(b):
            verdict, flagged, tags = "now growing", True, ["growth"]
        else:
            lb, la = int(b.get("live_end", 0)), int(a.get("live_end", 0))
            bigger = la >= max(lb * LIVE_CHANGE_RATIO, lb + LIVE_CHANGE_MIN)
            smaller = lb >= max(la * LIVE_CHANGE_RATIO, la + LIVE_CHANGE_MIN)
            if bigger:
                verdict, flagged, tags = "more live", True, ["live"]
            elif smaller:
                verdict, flagged = "fewer live", False
            elif growing(b) and not growing(a):
                verdict, flagged = "no longer growing", False
            else:
                verdict, flagged = "same", False
        if b is not None and a is not None and _line(b) != _line(a):
            subject += f" [line {_line(b)} -> {_line(a)}]"
        rows.append(
            Row(
                "site",
                subject,
                verdict,
                _site_evidence(b),
                _site_evidence(a),
                f"{s.get('wait_reason') or '-'}",
                flagged,
                tags,
                dict((a or {}).get("stacks") or {}),
            )
        )
    order = {True: 0, False: 1}
    rows.sort(key=lambda r: (order[r.flagged], r.subject))
    return rows


# --- functions --------------------------------------------------------------------------


def _ms(ns: Any) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f}ms"


def _function_rows(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[Row]:
    bm = {f["symbol"]: f for f in before if isinstance(f, dict) and "symbol" in f}
    am = {f["symbol"]: f for f in after if isinstance(f, dict) and "symbol" in f}
    rows: list[Row] = []
    for sym in sorted(set(bm) | set(am)):
        b, a = bm.get(sym), am.get(sym)
        if b is None or a is None:
            rows.append(
                Row("function", sym, "only before" if a is None else "only after",
                    "-" if b is None else f"{b.get('count', 0)} calls",
                    "-" if a is None else f"{a.get('count', 0)} calls", "", False)
            )  # fmt: skip
            continue
        if min(int(b.get("count") or 0), int(a.get("count") or 0)) < LATENCY_MIN_CALLS:
            rows.append(
                Row("function", sym, "too few calls", f"{b.get('count', 0)} calls",
                    f"{a.get('count', 0)} calls", f"< {LATENCY_MIN_CALLS} calls", False)
            )  # fmt: skip
            continue
        verdicts: list[str] = []
        tags: list[str] = []
        evidence: list[str] = []
        calls = min(int(b.get("count") or 0), int(a.get("count") or 0))
        for q in ("p50", "p99"):
            x, y = b.get(f"{q}_ns"), a.get(f"{q}_ns")
            if not x or y is None:
                continue
            if q == "p99" and calls < P99_MIN_CALLS:
                evidence.append(f"p99 not judged (< {P99_MIN_CALLS} calls)")
                continue
            change = y / x - 1
            evidence.append(f"{q} {_ms(x)} -> {_ms(y)} ({change:+.0%})")
            if abs(change) >= LATENCY_CHANGE and abs(y - x) >= LATENCY_MIN_NS:
                verdicts.append(f"{q} {'slower' if change > 0 else 'faster'}")
                if change > 0:
                    tags.append(f"{q}:{change:.6f}")
        rows.append(
            Row(
                "function",
                sym,
                ", ".join(verdicts) or "same",
                f"p50 {_ms(b.get('p50_ns'))}, p99 {_ms(b.get('p99_ns'))}, {b.get('count')} calls",
                f"p50 {_ms(a.get('p50_ns'))}, p99 {_ms(a.get('p99_ns'))}, {a.get('count')} calls",
                "; ".join(evidence),
                any("slower" in v for v in verdicts),
                tags,
            )
        )
    return rows


# --- the comparison ---------------------------------------------------------------------

_FAIL_RE = re.compile(
    r"^(growth|new-site|live|module|go-version|build|(p50|p99):\+(\d+(?:\.\d+)?)%)$"
)


def parse_fail_on(rules: list[str]) -> list[str]:
    out = []
    for rule in rules:
        for part in rule.split(","):
            part = part.strip()
            if not part:
                continue
            if not _FAIL_RE.match(part):
                raise DiffError(
                    f"--fail-on {part!r}: expected growth, new-site, live, module, go-version, "
                    "build, p50:+N% or p99:+N%"
                )
            out.append(part)
    return out


def _rule_matches(rule: str, row: Row) -> bool:
    m = re.match(r"^(p50|p99):\+(\d+(?:\.\d+)?)%$", rule)
    if m:
        want = float(m.group(2)) / 100
        for tag in row.tags:
            q, _, v = tag.partition(":")
            if q == m.group(1) and v and float(v) >= want:
                return True
        return False
    if rule == "build":
        return row.concern == "build"
    return rule in row.tags


def diff(
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    fail_on: list[str] | None = None,
    names: tuple[str, str] = ("before", "after"),
) -> Diff:
    check_record(before, names[0])
    check_record(after, names[1])
    d = Diff(
        names[0],
        names[1],
        _build_rows(before["build"], after["build"]),
        _site_rows(list(before["sites"]), list(after["sites"])),
        _function_rows(list(before["functions"]), list(after["functions"])),
    )
    for rule in parse_fail_on(fail_on or []):
        if any(_rule_matches(rule, r) for r in d.rows):
            d.failed.append(rule)
    return d


# --- output ---------------------------------------------------------------------------------


def render_text(d: Diff, *, all_rows: bool = False) -> str:
    lines = [f"goleash diff: {d.before} -> {d.after}"]
    for title, rows in (
        ("Build", d.build),
        ("Goroutine creation sites", d.sites),
        ("Function latency", d.functions),
    ):
        shown = rows if all_rows else [r for r in rows if r.flagged or r.concern == "build"]
        lines.append("")
        lines.append(f"== {title}: {sum(1 for r in rows if r.flagged)} flagged of {len(rows)}")
        if not shown:
            lines.append("   nothing changed beyond noise")
            continue
        for r in shown:
            mark = "!" if r.flagged else " "
            lines.append(f" {mark} {r.verdict:<18} {r.subject}")
            if r.concern != "build":
                lines.append(f"     before: {r.before}")
                lines.append(f"     after:  {r.after}")
                if r.evidence:
                    lines.append(f"     evidence: {r.evidence}")
            else:
                lines.append(f"     {r.evidence}")
    lines.append("")
    if d.failed:
        lines.append("FAIL: --fail-on " + ", ".join(d.failed))
    else:
        flagged = sum(1 for r in d.rows if r.flagged)
        lines.append(f"{flagged} findings" if flagged else "no differences beyond noise")
    return "\n".join(lines) + "\n"


def render_html(d: Diff, render_svg: Callable[[dict[tuple[str, ...], int], str], str]) -> str:
    """One self-contained page: the tables, and a flame graph of each flagged site.

    `render_svg` draws one flame graph (control.flamegraph's): passed in, so this
    module stays a leaf that node (which writes recordings) may import too.
    """
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>goleash diff {e(d.before)} -> {e(d.after)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
        ".flag{background:#fde2e2}.fail{color:#b00;font-weight:bold}</style></head><body>",
        f"<h1>goleash diff</h1><p>{e(d.before)} &rarr; {e(d.after)}</p>",
    ]
    if d.failed:
        parts.append(f"<p class='fail'>FAIL: --fail-on {e(', '.join(d.failed))}</p>")
    for title, rows in (("Build", d.build), ("Goroutine creation sites", d.sites),
                        ("Function latency", d.functions)):  # fmt: skip
        parts.append(f"<h2>{e(title)}</h2>")
        if not rows:
            parts.append("<p>nothing to compare</p>")
            continue
        parts.append(
            "<table><tr><th>verdict</th><th>subject</th><th>before</th><th>after</th>"
            "<th>evidence</th></tr>"
        )
        for r in rows:
            cls = " class='flag'" if r.flagged else ""
            parts.append(
                f"<tr{cls}><td>{e(r.verdict)}</td><td>{e(r.subject)}</td><td>{e(r.before)}</td>"
                f"<td>{e(r.after)}</td><td>{e(r.evidence)}</td></tr>"
            )
        parts.append("</table>")
    flagged_sites = [r for r in d.sites if r.flagged and r.stacks]
    if flagged_sites:
        parts.append("<h2>Flame graphs of the flagged sites (after)</h2>")
        for r in flagged_sites:
            stacks = {tuple(k.split(";")): int(v) for k, v in r.stacks.items()}
            parts.append(render_svg(stacks, r.subject))
    parts.append("</body></html>")
    return "\n".join(parts)
