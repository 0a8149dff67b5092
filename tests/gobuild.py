"""Build the Go fixtures under tests/fixtures/go with every supported toolchain.

Builds are cached by content (toolchain, variant, fixture sources) under
$GOLEASH_CACHE/fixtures, so a run builds each combination once and a second run on
the same machine builds nothing. Toolchains come from scripts/go-toolchains.txt,
installed by `make setup`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "go"
CACHE = Path(os.environ.get("GOLEASH_CACHE", "/var/cache/goleash"))


def _read_toolchains() -> list[str]:
    out = []
    for line in (REPO / "scripts" / "go-toolchains.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line.split()[0])
    return out


TOOLCHAINS: list[str] = _read_toolchains()

# variant -> (extra `go build` flags, CGO_ENABLED)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "default": ([], "0"),
    "stripped": (["-ldflags=-s -w"], "0"),
    "pie": (["-buildmode=pie"], "0"),
    "trimpath": (["-trimpath"], "0"),
    "cgo": ([], "1"),
}


class ToolchainMissing(RuntimeError):
    pass


def go_root(toolchain: str) -> Path:
    root = CACHE / "go" / toolchain
    if not (root / "bin" / "go").exists():
        raise ToolchainMissing(f"Go {toolchain} is not installed under {root}: run `make setup`")
    return root


def go_env(toolchain: str, cgo: str = "0") -> dict[str, str]:
    root = go_root(toolchain)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOROOT=str(root),
        GOTOOLCHAIN="local",  # never try to download another toolchain
        GOFLAGS="-mod=mod",
        GOPROXY="off",
        GOCACHE=str(CACHE / "gocache" / toolchain),
        GOPATH=str(CACHE / "gopath"),
        CGO_ENABLED=cgo,
        PATH=f"{root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        HOME=env.get("HOME", "/root"),
    )
    return env


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(src).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(fixture: str, toolchain: str, variant: str = "default") -> Path:
    """Path of `fixture` built with Go `toolchain` in `variant`; builds on first use."""
    src = FIXTURES / fixture
    if not src.is_dir():
        raise FileNotFoundError(f"no Go fixture {src}")
    flags, cgo = VARIANTS[variant]
    key = hashlib.sha256(
        f"v2|{fixture}|{toolchain}|{variant}|{_source_hash(src)}".encode()
    ).hexdigest()[:20]
    out_dir = CACHE / "fixtures" / key
    out = out_dir / fixture
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build once
        if out.exists():
            return out
        tmp = out_dir / f".{fixture}.tmp"
        go = str(go_root(toolchain) / "bin" / "go")
        # -buildvcs=false: a CI clone may belong to another user, and git would refuse it.
        cmd = [go, "build", "-buildvcs=false", *flags, "-o", str(tmp), "."]
        res = subprocess.run(
            cmd, cwd=src, env=go_env(toolchain, cgo), capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"go build of {fixture} with Go {toolchain} ({variant}) failed:\n{res.stderr}"
            )
        tmp.rename(out)
    return out


def marker_line(fixture: str, marker: str) -> tuple[str, int]:
    """(file name, 1-based line) of the line carrying `// GOSTMT: marker`."""
    for path in sorted((FIXTURES / fixture).glob("*.go")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if f"GOSTMT: {marker}" in line:
                return path.name, n
    raise LookupError(f"no GOSTMT: {marker} in fixture {fixture}")
