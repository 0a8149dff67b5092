"""Build the demo's Go programs (std lib only) with the newest installed toolchain.

The sources live with the test fixtures (tests/fixtures/go/demoserver, democlient);
builds are cached by content under $GOLEASH_CACHE/demo, so a second `make demo`
builds nothing. Offline: no module downloads, no toolchain switching.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from goleash.errors import GoleashError

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures" / "go"
CACHE = Path(os.environ.get("GOLEASH_CACHE", "/var/cache/goleash"))


class DemoBuildError(GoleashError):
    """The demo's Go programs cannot be built here."""


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def newest_toolchain() -> tuple[str, Path]:
    """(version, GOROOT) of the newest toolchain `make setup` installed."""
    listed = REPO / "scripts" / "go-toolchains.txt"
    versions = []
    if listed.exists():
        for line in listed.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                versions.append(line.split()[0])
    for v in sorted(versions, key=_version_key, reverse=True):
        root = CACHE / "go" / v
        if (root / "bin" / "go").exists():
            return v, root
    raise DemoBuildError(f"no Go toolchain under {CACHE / 'go'}: run `make setup` first")


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(src).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(fixture: str, name: str, into: Path) -> Path:
    """Build tests/fixtures/go/`fixture` and copy it to `into`/`name` (the executable's
    name is the service name the agent reports)."""
    src = FIXTURES / fixture
    if not src.is_dir():
        raise DemoBuildError(f"the demo's Go sources are missing ({src}): run it from the repo")
    version, root = newest_toolchain()
    key = hashlib.sha256(f"demo|{fixture}|{version}|{_source_hash(src)}".encode()).hexdigest()[:20]
    cached = CACHE / "demo" / key / fixture
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
        env.update(
            GOROOT=str(root),
            GOTOOLCHAIN="local",
            GOFLAGS="-mod=mod",
            GOPROXY="off",
            GOCACHE=str(CACHE / "gocache" / version),
            GOPATH=str(CACHE / "gopath"),
            CGO_ENABLED="0",
            PATH=f"{root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
            HOME=env.get("HOME", "/root"),
        )
        tmp = cached.with_name(f".{fixture}.{os.getpid()}.tmp")
        res = subprocess.run(
            [str(root / "bin" / "go"), "build", "-buildvcs=false", "-o", str(tmp), "."],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise DemoBuildError(f"go build of {fixture} (Go {version}) failed:\n{res.stderr}")
        tmp.rename(cached)
    into.mkdir(parents=True, exist_ok=True)
    out = into / name
    shutil.copy2(cached, out)
    return out
