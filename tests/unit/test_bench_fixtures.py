"""Every Go program a bench section builds exists (the goprograms/ move once left
three sections pointing at fixtures that were not there)."""

from __future__ import annotations

import ast
from pathlib import Path

from goleash import gobuild
from goleash.bench import CHECKOUT_FIXTURES

BENCH = Path(gobuild.__file__).with_name("bench")


def _fixture_names() -> set[str]:
    names = set()
    for path in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "fixture"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    return names


def test_every_bench_program_has_its_sources() -> None:
    names = _fixture_names()
    assert {"benchload", "funclat", "populations", "service"} <= names
    missing = [
        n
        for n in sorted(names)
        if not (gobuild.PROGRAMS / n).is_dir() and not (CHECKOUT_FIXTURES / n).is_dir()
    ]
    assert not missing, f"bench sections build Go programs that do not exist: {missing}"
