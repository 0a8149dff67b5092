"""Build the demo's Go programs (std lib only) with the newest installed toolchain.

The sources live with the test fixtures (tests/fixtures/go/demoserver, democlient)
and are built, cached by content, by the same builder the tests use.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from goleash import fixtures


def newest_toolchain() -> tuple[str, Path]:
    """(version, GOROOT) of the newest toolchain `make setup` installed."""
    version = fixtures.newest_toolchain()
    return version, Path(fixtures.gobuild().go_root(version))


def build(fixture: str, name: str, into: Path) -> Path:
    """Build tests/fixtures/go/`fixture` and copy it to `into`/`name` (the executable's
    name is the service name the agent reports)."""
    built = fixtures.build(fixture, fixtures.newest_toolchain())
    into.mkdir(parents=True, exist_ok=True)
    out = into / name
    shutil.copy2(built, out)
    return out
