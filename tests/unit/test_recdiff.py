"""`goleash diff`'s pure comparison of two recordings (goleash.recdiff)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from goleash.control.flamegraph import render_svg
from goleash.recdiff import (
    RECORD_KIND,
    RECORD_VERSION,
    DiffError,
    diff,
    growth_per_minute,
    match_sites,
    parse_fail_on,
    render_html,
    render_text,
)


def _site(function: str, stmt: str, start: int, end: int, growth: float, **kw: Any) -> dict:
    return {
        "function": function,
        "go_statement": stmt,
        "created_by": kw.pop("created_by", "main.serve"),
        "created": end,
        "live_start": start,
        "live_end": end,
        "growth_per_min": growth,
        "wait_reason": "chan receive",
        "stacks": {"runtime.goexit;main.watch;runtime.gopark": 1},
        **kw,
    }


def _rec(**kw: Any) -> dict:
    rec = {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "build": {
            "go_version": "go1.22.10",
            "main_module": "example.com/svc",
            "deps": {"golang.org/x/net": "v0.20.0"},
            "settings": {"-ldflags": "-s"},
        },
        "sites": [
            _site("main.watch", "/src/main.go:40", 0, 0, 0.0),
            _site(
                "net/http.(*conn).serve",
                "/go/src/net/http/server.go:3290",
                5,
                6,
                1.0,
                created_by="net/http.(*Server).Serve",
            ),
        ],  # fmt: skip
        "functions": [{"symbol": "main.handle", "count": 600, "p50_ns": 2e6, "p99_ns": 5e6}],
    }
    rec.update(kw)
    return rec


def test_growth_per_minute_is_the_slope() -> None:
    assert growth_per_minute([(0, 10), (1, 12), (2, 14)]) == pytest.approx(120.0)
    assert growth_per_minute([(0, 5)]) == 0.0
    assert growth_per_minute([(1, 5), (1, 9)]) == 0.0


def test_a_recording_against_itself_flags_nothing() -> None:
    a = _rec()
    d = diff(a, copy.deepcopy(a), fail_on=["growth", "new-site", "p99:+20%", "build"])
    assert d.failed == []
    assert not [r for r in d.rows if r.flagged]
    assert "no differences beyond noise" in render_text(d)


def test_upgrade_findings_and_fail_on() -> None:
    before = _rec()
    after = _rec(
        build={
            "go_version": "go1.27.3",
            "main_module": "example.com/svc",
            "deps": {"golang.org/x/net": "v0.30.0", "example.com/new": "v1.0.0"},
            "settings": {"-ldflags": "-s"},
        },
        sites=[
            # The go statement moved 3 lines down: still the same site.
            _site("main.watch", "/src/main.go:43", 10, 200, 900.0),
            _site(
                "net/http.(*conn).serve",
                "/go/src/net/http/server.go:3604",
                10,
                200,
                900.0,
                created_by="net/http.(*Server).Serve",
            ),
            _site("main.audit", "/src/main.go:70", 0, 40, 300.0),
        ],  # fmt: skip
        functions=[{"symbol": "main.handle", "count": 600, "p50_ns": 20e6, "p99_ns": 30e6}],
    )
    d = diff(before, after, fail_on=["growth", "p99:+20%", "p50:+2000%"])
    assert d.failed == ["growth", "p99:+20%"]  # p50 rose 900 %, not 2000 %
    by = {r.subject.split(" (")[0]: r for r in d.sites}
    assert by["main.watch"].verdict == "now growing"
    assert "[line 40 -> 43]" in by["main.watch"].subject
    assert by["net/http.(*conn).serve"].verdict == "now growing"
    assert by["main.audit"].verdict == "new, growing"
    builds = {r.subject: r for r in d.build}
    assert builds["Go version"].evidence == "go1.22.10 -> go1.27.3"
    assert builds["module golang.org/x/net"].verdict == "changed"
    assert builds["module example.com/new"].verdict == "added"
    (fn,) = d.functions
    assert fn.flagged and fn.verdict == "p50 slower, p99 slower"
    page = render_html(d, render_svg)
    assert page.count("<svg") == 3 and "FAIL" in page


def test_two_go_statements_of_one_creator_pair_in_line_order() -> None:
    b = [_site("main.w", "/a.go:10", 0, 0, 0), _site("main.w", "/a.go:20", 0, 0, 0)]
    a = [_site("main.w", "/a.go:12", 0, 0, 0), _site("main.w", "/a.go:22", 0, 0, 0)]
    pairs = match_sites(b, a)
    assert [(x["go_statement"], y["go_statement"]) for x, y in pairs] == [
        ("/a.go:10", "/a.go:12"),
        ("/a.go:20", "/a.go:22"),
    ]


def test_latency_noise_and_too_few_calls_are_not_findings() -> None:
    after = _rec(
        functions=[{"symbol": "main.handle", "count": 600, "p50_ns": 2.1e6, "p99_ns": 5.5e6}]
    )
    assert not diff(_rec(), after).functions[0].flagged
    few = _rec(functions=[{"symbol": "main.handle", "count": 3, "p50_ns": 90e6, "p99_ns": 90e6}])
    assert diff(_rec(), few).functions[0].verdict == "too few calls"


@pytest.mark.parametrize("bad", ["grow", "p99:20%", "p75:+20%", "p99:+x%"])
def test_bad_fail_on_rules(bad: str) -> None:
    with pytest.raises(DiffError):
        parse_fail_on([bad])


def test_not_a_recording() -> None:
    with pytest.raises(DiffError):
        diff({"kind": "other"}, _rec())
    with pytest.raises(DiffError):
        diff(_rec(), {**_rec(), "version": 99})


def test_p99_needs_enough_calls_to_be_judged() -> None:
    before = _rec(functions=[{"symbol": "f", "count": 130, "p50_ns": 2e6, "p99_ns": 2.5e6}])
    after = _rec(functions=[{"symbol": "f", "count": 130, "p50_ns": 2e6, "p99_ns": 25e6}])
    (row,) = diff(before, after, fail_on=["p99:+20%"]).functions
    assert not row.flagged and "p99 not judged" in row.evidence
