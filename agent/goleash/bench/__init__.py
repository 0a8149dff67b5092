"""`make bench`: performance figures as ratios against a baseline measured in the
same run (never absolute timings from a test). Each section module exposes
`run(report: Report) -> None`; `python -m goleash.bench [SECTION...]` runs them.
"""

from __future__ import annotations

import json
import sys
import time
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


def fixture(name: str, toolchain: str, variant: str = "default") -> Path:
    """Build a Go fixture of tests/fixtures/go with the tests' builder."""
    tests = Path(__file__).resolve().parents[3] / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import gobuild  # type: ignore[import-not-found]

    return Path(gobuild.build(name, toolchain, variant))
