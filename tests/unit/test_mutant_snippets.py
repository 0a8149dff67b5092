"""`make mutants` plants each bug by replacing one snippet; a snippet that moved with
a refactor silently plants nothing. Each must stand exactly once in its file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutant_finds_its_snippet_once() -> None:
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    assert spec is not None and spec.loader is not None
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants  # dataclasses look their module up
    spec.loader.exec_module(mutants)
    off = {
        m.name: (ROOT / m.file).read_text().count(m.original) if (ROOT / m.file).exists() else -1
        for m in mutants.MUTANTS
    }
    assert len(off) >= 17
    assert {n: c for n, c in off.items() if c != 1} == {}
