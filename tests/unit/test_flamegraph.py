"""Flame graphs of creation stacks: folded stacks and the SVG drawn from them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.flamegraph import creation_stacks, folded_line, render_svg


def _goroutine(frames: list[str], reason: str) -> t.Goroutine:
    g = t.Goroutine(function="main.leak", go_statement="/src/main.go:42", wait_reason=reason)
    for f in frames:  # innermost first, as the API sends stacks
        g.stack.add(function=f)
    return g


def test_creation_stacks_are_rooted_at_the_go_statement_and_weighted_by_live() -> None:
    g = _goroutine(
        ["runtime.gopark", "runtime.chanrecv1", "main.leak", "main.h.gowrap1", "runtime.goexit"],
        "chan receive",
    )
    stacks = creation_stacks(
        [
            ("main.h", "/src/main.go:42", "main.leak", 300),
            ("main.serve", "/src/a.go:9", "main.w", 4),
        ],
        {("main.leak", "/src/main.go:42"): g},
    )
    assert stacks == {
        (
            "go main.h (/src/main.go:42)",
            "main.leak",
            "runtime.chanrecv1",
            "runtime.gopark",
            "[chan receive]",
        ): 300,
        ("go main.serve (/src/a.go:9)", "main.w"): 4,
    }
    assert folded_line(("a;b", "c"), 3) == "a:b;c 3"


def test_svg_is_well_formed_widths_follow_counts_and_names_are_escaped() -> None:
    svg = render_svg({("go <main>", "a&b"): 3, ("go <main>", "c"): 1}, "t & <x>")
    root = ET.fromstring(svg)  # parses: escaping is right
    ns = "{http://www.w3.org/2000/svg}"
    rects = {
        g.find(f"{ns}title").text: float(g.find(f"{ns}rect").get("width"))  # type: ignore[union-attr]
        for g in root.iter(f"{ns}g")
    }
    widths = {re.sub(r" \(.*", "", k): v for k, v in rects.items()}
    assert widths["all"] == widths["go <main>"]
    assert abs(widths["a&b"] - 3 * widths["c"]) < 0.2
    assert "4 goroutines, 100.0%" in next(k for k in rects if k.startswith("all"))
    assert "no goroutines" in render_svg({}, "empty")
