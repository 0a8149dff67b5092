"""`goleash dump --format pprof|folded` of a running process, read by the tools users run.

The `populations` fixture holds known numbers of goroutines per function; the
profile goleash writes from the process's memory must give `go tool pprof` (from a
real Go toolchain) exactly those counts per function, and the folded stacks must
sum to them. Needs root (reading another process's memory).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gobuild
from populations import running_populations

pytestmark = pytest.mark.root

# Only goroutines parked for good (no workers): none can change while it is read,
# so the counts are exact on a busy machine too.
COUNTS = {"orphan": 21, "nilselect": 8, "condwait": 5, "sleeper": 4}
OTHERS = 1  # main, reading its stdin


def goleash(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res


def pprof(toolchain: str, *args: str) -> str:
    go = gobuild.go_root(toolchain) / "bin" / "go"
    res = subprocess.run(
        [str(go), "tool", "pprof", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=gobuild.go_env(toolchain),
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def top_rows(text: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """(total, function -> (flat, cum)) from `go tool pprof -top`."""
    total = int(re.search(r"of (\d+) total", text).group(1))  # type: ignore[union-attr]
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+\S+%\s+\S+%\s+(\d+)\s+\S+%\s+(.+?)(?: \(inline\))?$", line)
        if m:
            rows[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    return total, rows


@pytest.mark.parametrize("toolchain", [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]])
def test_pprof_profile_counts_per_function(toolchain: str, tmp_path: Path) -> None:
    with running_populations(toolchain, **COUNTS) as pop:
        out = tmp_path / "goroutines.pb.gz"
        res = goleash("dump", "--pid", str(pop.pid), "--format", "pprof", "-o", str(out))
        assert res.stdout == "" and f"PID {pop.pid}" in res.stderr
        assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as pprof's own profiles
        folded = goleash("dump", "--pid", str(pop.pid), "--format", "folded").stdout
        doc = json.loads(goleash("dump", "--pid", str(pop.pid), "--json").stdout)

    top = pprof(toolchain, "-top", "-nodecount=1000", str(out))
    assert "Type: goroutine" in top
    total, rows = top_rows(top)
    assert total == sum(COUNTS.values()) + OTHERS == len(doc["goroutines"])
    for name, n in COUNTS.items():
        assert rows[f"main.{name}"][1] == n, f"main.{name} in:\n{top}"
    # parked goroutines end in gopark, as in Go's own goroutine profile
    parked = COUNTS["orphan"] + COUNTS["nilselect"] + COUNTS["condwait"]
    assert rows["runtime.gopark"][0] >= parked

    # every sample carries the goroutine's state: pprof can focus on one wait reason
    _, focused = top_rows(pprof(toolchain, "-top", "-tagfocus=state=chan receive", str(out)))
    assert focused["main.orphan"][1] == COUNTS["orphan"]
    assert not {"main.nilselect", "main.condwait", "main.sleeper"} & set(focused), focused

    # folded: root first, leaf last, counts that sum per function to the same numbers
    lines = folded.splitlines()
    assert lines and all(re.fullmatch(r"\S.* \d+", ln) for ln in lines), folded
    per_function: dict[str, int] = {}
    for ln in lines:
        stack, n = ln.rsplit(" ", 1)
        for fn in set(stack.split(";")):
            per_function[fn] = per_function.get(fn, 0) + int(n)
    for name, n in COUNTS.items():
        assert per_function[f"main.{name}"] == n, folded
    orphan_lines = [ln for ln in lines if ";main.orphan;" in ln]
    assert all(ln.rsplit(" ", 1)[0].endswith("runtime.gopark") for ln in orphan_lines)
    assert sum(int(ln.rsplit(" ", 1)[1]) for ln in lines) == total


def test_json_and_another_format_together_are_refused() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "dump", "--pid", "1", "--json", "--format", "pprof"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "disagree" in res.stderr and "Traceback" not in res.stderr
