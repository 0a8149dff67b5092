"""Ages of goroutines that existed before tracing started are lower bounds, and
`goleash trace` says so: ">=" before the oldest age in text, a boolean in JSON.
Needs root (BPF probes, process memory)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import gobuild
from populations import running_populations

pytestmark = pytest.mark.root


def trace(pid: int, *extra: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "trace", "--pid", str(pid)]
        + ["--duration", "1.5", "--interval", "1", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_goroutines_older_than_the_trace_have_lower_bound_ages() -> None:
    with running_populations(gobuild.TOOLCHAINS[-1], orphan=10, sleeper=3) as pop:
        doc = json.loads(trace(pop.pid, "--json"))
        sites = {s["function"]: s for s in doc["sites"]}
        for fn in ("main.orphan", "main.sleeper"):
            assert sites[fn]["live"] > 0 and sites[fn]["age_max_lower_bound"] is True, sites[fn]
        text = trace(pop.pid)
        # One table per interval: two when the probes are up in under a second (a
        # cached program); the last is the summary.
        rows = [ln for ln in text.splitlines() if " main.sleeper  (" in ln]
        assert rows and "/>=" in rows[-1], text  # p50/p99/>=max
