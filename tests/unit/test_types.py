"""mypy over the whole package, as `make lint` runs it: in the suite, so CI holds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_package_type_checks() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],  # files/exclude: pyproject.toml
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
