"""Build Go programs (standard library only) with the toolchains `make setup` installed.

One builder for everything goleash compiles: the demo's and bench's programs (package
data under goleash/goprograms, so an installed wheel can build them) and the tests'
fixtures (tests/gobuild.py passes their directory). Builds run offline (no module
proxy, no toolchain switching) and are cached by content (toolchain, variant, sources)
under $GOLEASH_CACHE/fixtures, so each combination is built once per machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path

from goleash.errors import GoleashError

# The demo's and bench's Go sources, shipped inside the package.
PROGRAMS = Path(__file__).resolve().with_name("goprograms")
CACHE = Path(os.environ.get("GOLEASH_CACHE", "/var/cache/goleash"))

# variant -> (extra `go build` flags, CGO_ENABLED)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "default": ([], "0"),
    "stripped": (["-ldflags=-s -w"], "0"),
    "pie": (["-buildmode=pie"], "0"),
    "trimpath": (["-trimpath"], "0"),
    "cgo": ([], "1"),
}


class GoBuildError(GoleashError, RuntimeError):
    """A Go program cannot be built here (no toolchain, no sources, compile error)."""


class ToolchainMissing(GoBuildError):
    """The requested Go toolchain is not installed under $GOLEASH_CACHE/go."""


def go_root(toolchain: str) -> Path:
    root = CACHE / "go" / toolchain
    if not (root / "bin" / "go").exists():
        raise ToolchainMissing(f"Go {toolchain} is not installed under {root}: run `make setup`")
    return root


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".") if x.isdigit())


def installed_toolchains() -> list[str]:
    """Versions under $GOLEASH_CACHE/go that have a working layout, oldest first."""
    base = CACHE / "go"
    found = [p.name for p in base.glob("*") if (p / "bin" / "go").exists()] if base.is_dir() else []
    return sorted(found, key=_version_key)


def newest_toolchain() -> str:
    """The newest installed Go toolchain."""
    versions = installed_toolchains()
    if not versions:
        raise ToolchainMissing(f"no Go toolchain under {CACHE / 'go'}: run `make setup` first")
    return versions[-1]


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


def build_dir(src: Path, toolchain: str, variant: str = "default") -> Path:
    """The Go program in directory `src` built with Go `toolchain` in `variant`
    (cached by content); its executable is named after the directory."""
    name = src.name
    if not src.is_dir():
        raise GoBuildError(f"no Go program at {src}")
    if variant not in VARIANTS:
        raise GoBuildError(f"unknown build variant {variant!r} (one of {', '.join(VARIANTS)})")
    flags, cgo = VARIANTS[variant]
    # The key's format predates this module: keep it so existing caches stay valid.
    key = hashlib.sha256(
        f"v2|{name}|{toolchain}|{variant}|{_source_hash(src)}".encode()
    ).hexdigest()[:20]
    out_dir = CACHE / "fixtures" / key
    out = out_dir / name
    if out.exists():
        return out
    go = str(go_root(toolchain) / "bin" / "go")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel builders build once
        if out.exists():
            return out
        tmp = out_dir / f".{name}.tmp"
        # -buildvcs=false: a CI clone may belong to another user, and git would refuse it.
        cmd = [go, "build", "-buildvcs=false", *flags, "-o", str(tmp), "."]
        res = subprocess.run(
            cmd, cwd=src, env=go_env(toolchain, cgo), capture_output=True, text=True
        )
        if res.returncode != 0:
            raise GoBuildError(
                f"go build of {name} with Go {toolchain} ({variant}) failed:\n{res.stderr}"
            )
        tmp.rename(out)
    return out


def build(program: str, toolchain: str | None = None, variant: str = "default") -> Path:
    """One of the package's own Go programs (goleash/goprograms/`program`), built."""
    return build_dir(PROGRAMS / program, toolchain or newest_toolchain(), variant)
