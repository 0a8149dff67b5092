"""The tests' view of goleash's Go builder (goleash.gobuild): the toolchains every
test runs with (scripts/go-toolchains.txt) and the fixtures under tests/fixtures/go.

The builder itself lives in the package, so `make demo` and `make bench` build their
Go programs without code from tests/. A fixture name not under tests/fixtures/go is
looked up among the package's own programs (goleash/goprograms: demoserver,
democlient, benchload).
"""

from __future__ import annotations

from pathlib import Path

from goleash.gobuild import (  # noqa: F401  (re-exported for the tests)
    CACHE,
    PROGRAMS,
    VARIANTS,
    GoBuildError,
    ToolchainMissing,
    build_dir,
    go_env,
    go_root,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "go"


def _read_toolchains() -> list[str]:
    out = []
    for line in (REPO / "scripts" / "go-toolchains.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line.split()[0])
    return out


TOOLCHAINS: list[str] = _read_toolchains()


def source_dir(fixture: str) -> Path:
    src = FIXTURES / fixture
    if src.is_dir():
        return src
    if (PROGRAMS / fixture).is_dir():
        return PROGRAMS / fixture
    raise FileNotFoundError(f"no Go fixture {src} (nor {PROGRAMS / fixture})")


def build(fixture: str, toolchain: str, variant: str = "default") -> Path:
    """Path of `fixture` built with Go `toolchain` in `variant`; builds on first use."""
    return build_dir(source_dir(fixture), toolchain, variant)


def marker_line(fixture: str, marker: str) -> tuple[str, int]:
    """(file name, 1-based line) of the line carrying `// GOSTMT: marker`."""
    for path in sorted(source_dir(fixture).glob("*.go")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if f"GOSTMT: {marker}" in line:
                return path.name, n
    raise LookupError(f"no GOSTMT: {marker} in fixture {fixture}")
