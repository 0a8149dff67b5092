"""The Go programs of this checkout (tests/fixtures/go), built by the tests' builder.

`make demo` and `make bench` run Go programs that live with the test fixtures;
tests/gobuild.py is the one place that knows the toolchains, the build
environment (offline, no toolchain switching) and the content-keyed cache.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

from goleash.errors import GoleashError

TESTS = Path(__file__).resolve().parents[2] / "tests"


class FixtureBuildError(GoleashError):
    """A Go program of tests/fixtures/go cannot be built here."""


@cache
def gobuild() -> ModuleType:
    path = TESTS / "gobuild.py"
    if not path.exists():
        raise FixtureBuildError(f"{path} is missing: run this from a goleash checkout")
    spec = importlib.util.spec_from_file_location("gobuild", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def newest_toolchain() -> str:
    """The newest Go toolchain `make setup` installed."""
    gb = gobuild()

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    for version in sorted(gb.TOOLCHAINS, key=key, reverse=True):
        try:
            gb.go_root(version)
        except gb.ToolchainMissing:
            continue
        return str(version)
    raise FixtureBuildError(f"no Go toolchain under {gb.CACHE / 'go'}: run `make setup` first")


def build(fixture: str, toolchain: str, variant: str = "default") -> Path:
    try:
        return Path(gobuild().build(fixture, toolchain, variant))
    except (RuntimeError, FileNotFoundError) as exc:
        raise FixtureBuildError(str(exc)) from None
