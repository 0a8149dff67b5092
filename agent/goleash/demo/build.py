"""Build the demo's Go programs (std lib only) with the newest installed toolchain.

The sources are package data (goleash/goprograms/demoserver, democlient), built and
cached by content by goleash.gobuild, the builder the tests use too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from goleash import gobuild


def newest_toolchain() -> tuple[str, Path]:
    """(version, GOROOT) of the newest toolchain `make setup` installed."""
    version = gobuild.newest_toolchain()
    return version, gobuild.go_root(version)


def build(fixture: str, name: str, into: Path) -> Path:
    """Build goleash/goprograms/`fixture` and copy it to `into`/`name` (the executable's
    name is the service name the agent reports)."""
    built = gobuild.build(fixture)
    into.mkdir(parents=True, exist_ok=True)
    out = into / name
    shutil.copy2(built, out)
    return out
