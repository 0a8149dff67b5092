"""DESIGN.md's import rule: the control plane runs where BCC is not, so nothing it loads
may pull in bcc, goleash.probes or goleash.node."""

from __future__ import annotations

import json
import subprocess
import sys

CONTROL_MODULES = [
    "goleash.control.server",
    "goleash.control.client",
    "goleash.control.views",
    "goleash.control.metrics",
    "goleash.control.state",
    "goleash.control.detect",
]


def test_control_plane_never_loads_bcc_probes_or_node() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {CONTROL_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    forbidden = [
        m for m in loaded if m == "bcc" or m.startswith(("bcc.", "goleash.probes", "goleash.node"))
    ]
    assert not forbidden, f"the control plane loads {forbidden}"
    assert "goleash.control.server" in loaded
