"""Where a decision's evidence files are, for alerts to link to instead of embedding.

The policy engine writes, per degrade decision, a flame graph of the offending
goroutines' creation stacks as SVG, the same stacks folded and as a pprof profile
(evidence keys `flamegraph_svg`, `flamegraph_folded`, `goroutines_pprof`: paths on
the control plane's host), and, when the control plane has an external URL, the
URLs it serves them at (`links`, with `control_plane`: its external URL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EVIDENCE_FILES = ("flamegraph_svg", "flamegraph_folded", "goroutines_pprof")


def evidence_links(evidence: Mapping[str, Any]) -> dict[str, str]:
    """file kind -> URL (or host path when no URL is known); only files that exist."""
    links = evidence.get("links") or {}
    out = {}
    for k in EVIDENCE_FILES:
        where = links.get(k) or evidence.get(k)
        if where:
            out[k] = str(where)
    return out


def generator_url(evidence: Mapping[str, Any]) -> str:
    """Alertmanager's generatorURL: the flame graph as the control plane serves it,
    else the control plane's external URL, else "" (none configured)."""
    links = evidence.get("links") or {}
    return str(links.get("flamegraph_svg") or links.get("control_plane") or "")
