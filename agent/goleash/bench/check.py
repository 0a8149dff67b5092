"""`goleash check -- go test -count=1 ./...` against `go test -count=1 ./...` alone, on
the leakcheck fixture module (4 packages), wall time, same toolchain, warm build
cache. The goal in issue 13 is a ratio of at most 1.5.

The fixed cost is one BCC compile of check.bpf.c (every release shares it; it runs
while `go test` builds, but test binaries wait for it at their -exec gate), the Python
start and the removal of the probes at the end; per test binary, a stop at exec while
its probes are attached and one at exit while its goroutines are read.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from goleash import gobuild
from goleash.bench import Report

RUNS = 3


def _time(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.monotonic()
    subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def run(report: Report) -> None:
    toolchain = gobuild.newest_toolchain()
    # A Go module with tests, shared with tests/bpf/test_check.py: this section runs
    # from a checkout (`make bench`), never from an installed wheel.
    module = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "go" / "leakcheck"
    if not module.is_dir():
        raise FileNotFoundError(f"{module} is missing: run `make bench` from a goleash checkout")
    env = gobuild.go_env(toolchain)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    go_test = ["go", "test", "-count=1", "./..."]
    check = [sys.executable, "-m", "goleash.cli", "check", "--", *go_test]
    _time(go_test, module, env)  # warm the build cache
    plain, checked = [], []
    for _ in range(RUNS):  # interleaved, so drift in machine load hits both alike
        plain.append(_time(go_test, module, env))
        checked.append(_time(check, module, env))
    p, c = statistics.median(plain), statistics.median(checked)
    report.line(f"go test ./... alone (go{toolchain}, median of {RUNS})", p, "s")
    report.line("goleash check -- go test ./...", c, "s")
    report.line("goleash check / go test", c / p, "x", "goal <= 1.5")
