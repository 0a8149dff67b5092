"""Folded stacks -> a self-contained SVG flame graph (no script, no external files).

Alerts carry one: where the offending goroutines were created (the `go` statement
at the root) and what they are doing now (their stack above it), each frame as wide
as the goroutines that pass through it. The folded format is Brendan Gregg's:
frames joined by ';', root first, with a count.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape as _xml_escape

from goleash.api.goleash.v1 import types_pb2 as t

WIDTH = 1200
ROW = 17
PAD = 10
CHAR_PX = 6.6  # average glyph width of 11px monospace, to decide what text fits
# Characters XML 1.0 cannot carry at all (not even as references); names come from
# agents, so one of these would make the whole report unreadable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


def escape(text: str) -> str:
    """Text for an SVG element: XML-escaped, control characters shown as \\xNN."""
    return _xml_escape(_NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


@dataclass
class _Node:
    name: str
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def folded_line(frames: Sequence[str], count: int) -> str:
    """One line of folded output: frames root first, ';'-joined, then the count."""
    # one stack a line: a newline in an agent-supplied name must not start another
    return (
        ";".join(
            _NOT_XML.sub("?", f.replace(";", ":").replace("\n", "?").replace("\r", "?"))
            for f in frames
        )
        + f" {count}"
    )


def creation_stacks(
    sites: Iterable[tuple[str, str, str, int]],
    examples: Mapping[tuple[str, str], t.Goroutine],
) -> dict[tuple[str, ...], int]:
    """Stacks of a set of creation sites, weighted by their live goroutines.

    `sites` are (creator function, go statement, started function, live); `examples`
    maps (function, go statement) to a representative goroutine whose current stack
    (innermost first, as the API sends it) is drawn on top of the creation site.
    """
    out: dict[tuple[str, ...], int] = {}
    for creator, stmt, function, live in sites:
        if live <= 0:
            continue
        root = f"{creator or '?'} ({stmt})" if stmt else creator or "?"
        frames = [f"go {root}", function]
        g = examples.get((function, stmt))
        if g is not None:
            now = [fr.function for fr in reversed(g.stack) if fr.function != "runtime.goexit"]
            # Go 1.21+ starts `go f(x)` in a wrapper (caller.gowrapN) that calls f: the
            # started function is drawn once, with what runs above it
            if function in now:
                now = now[now.index(function) + 1 :]
            frames += now
            if g.wait_reason:
                frames.append(f"[{g.wait_reason}]")
        key = tuple(frames)
        out[key] = out.get(key, 0) + live
    return out


def _tree(stacks: Mapping[tuple[str, ...], int]) -> _Node:
    root = _Node("all")
    for frames, n in stacks.items():
        root.count += n
        node = root
        for f in frames:
            node = node.children.setdefault(f, _Node(f))
            node.count += n
    return root


def _color(name: str) -> str:
    if name.startswith("go "):
        return "rgb(120,160,220)"  # creation sites: blue, so the root reads as "where"
    if name.startswith("["):
        return "rgb(200,200,200)"
    h = hashlib.md5(name.encode()).digest()  # stable colours across renders
    if name.startswith("runtime.") or name.startswith("internal/"):
        return f"rgb({200 + h[0] % 50},{180 + h[1] % 40},{60 + h[2] % 40})"
    return f"rgb({220 + h[0] % 35},{90 + h[1] % 110},{40 + h[2] % 40})"


def render_svg(stacks: Mapping[tuple[str, ...], int], title: str) -> str:
    """An SVG flame graph of `stacks` (frames root first -> count)."""
    root = _tree(stacks)
    depth = max((len(f) for f in stacks), default=0)
    height = (depth + 1) * ROW + 3 * PAD + 20
    scale = (WIDTH - 2 * PAD) / root.count if root.count else 0.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="rgb(250,250,245)"/>',
        f'<text x="{WIDTH / 2}" y="{PAD + 12}" text-anchor="middle" font-size="14">'
        f"{escape(title)}</text>",
    ]
    if not root.count:
        out.append(f'<text x="{PAD}" y="{PAD + 40}">no goroutines to draw</text></svg>')
        return "\n".join(out)

    # depth-first without recursion: a 3000-frame stack must not raise RecursionError
    todo: list[tuple[_Node, float, int]] = [(root, PAD, 0)]
    while todo:
        node, x, level = todo.pop()
        w = node.count * scale
        y = height - PAD - (level + 1) * ROW
        pct = 100.0 * node.count / root.count
        label = f"{node.name} ({node.count} goroutine{'s' if node.count != 1 else ''}, {pct:.1f}%)"
        out.append(
            f'<g><title>{escape(label)}</title><rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}"'
            f' height="{ROW - 1}" fill="{_color(node.name)}" rx="2"/>'
        )
        fits = int((w - 6) / CHAR_PX)
        if fits >= 3:
            text = node.name if len(node.name) <= fits else node.name[: fits - 2] + ".."
            out.append(f'<text x="{x + 3:.1f}" y="{y + ROW - 5}">{escape(text)}</text>')
        out.append("</g>")
        cx = x
        children = []
        for child in sorted(node.children.values(), key=lambda c: c.name):
            children.append((child, cx, level + 1))
            cx += child.count * scale
        todo.extend(reversed(children))  # drawn in name order, as before
    out.append("</svg>")
    return "\n".join(out)
