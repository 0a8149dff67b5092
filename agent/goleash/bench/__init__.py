"""`make bench`: performance figures as ratios against a baseline measured in the
same run (never absolute timings from a test). Each section module exposes
`run(report: Report) -> None`; `python -m goleash.bench [SECTION...]` runs them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Line:
    section: str
    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    section: str = ""
    started: float = field(default_factory=time.time)

    def line(self, name: str, value: float, unit: str, note: str = "") -> None:
        ln = Line(self.section, name, float(value), unit, note)
        self.lines.append(ln)
        val = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        print(f"  {name:<58} {val:>14} {unit:<10} {note}", flush=True)

    def to_json(self) -> dict[str, Any]:
        return {"started": self.started, "lines": [asdict(x) for x in self.lines]}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


# The test suite's Go fixtures, for sections that measure on them (run from a checkout).
CHECKOUT_FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "go"


def fixture(name: str, toolchain: str, variant: str = "default") -> Path:
    """Build one of the package's Go programs (goleash/goprograms), or else one of the
    checkout's test fixtures (funclat, populations, service)."""
    from goleash import gobuild

    if (gobuild.PROGRAMS / name).is_dir() or not (CHECKOUT_FIXTURES / name).is_dir():
        return gobuild.build(name, toolchain, variant)
    return gobuild.build_dir(CHECKOUT_FIXTURES / name, toolchain, variant)


@contextmanager
def bpftrace(binary: Path, pid: int, probes: dict[str, str]) -> Iterator[None]:
    """bpftrace counting hits of `probes` (symbol -> map name) in PID, live until exit.

    No -p: bpftrace 0.17 aborts comparing mount namespaces here; a predicate filters
    the same way (the probe still fires for other processes, as goleash's pid
    filter does not). BEGIN runs once every probe is attached: its line says the
    tracer is live.
    """
    prog = 'BEGIN { printf("attached\\n"); } ' + " ".join(
        f"uprobe:{binary}:{sym} /pid == {pid}/ {{ @{name} = count(); }}"
        for sym, name in probes.items()
    )
    p = subprocess.Popen(
        ["bpftrace", "-e", prog], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert p.stdout is not None
    seen = []
    for line in p.stdout:  # warnings (e.g. RLIMIT_MEMLOCK) may come first
        seen.append(line)
        if line.startswith("attached"):
            break
    else:
        p.wait()
        raise RuntimeError("bpftrace did not attach:\n" + "".join(seen))
    try:
        yield
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        finally:
            if p.poll() is None:  # a stray bpftrace would keep probing every run after
                p.kill()
                p.wait()
