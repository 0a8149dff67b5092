"""`goleash check`'s memory of test binaries across runs: where check.bpf.c's probes go
in an executable, stored under the SHA-256 of the whole file.

A test binary waits stopped at its first instruction until its probes are attached,
and finding their sites (ELF, symbols, disassembly) costs 50-100 ms of that stop per
binary. Go's build cache makes `go test` link the same bytes again whenever the code
did not change, so most runs of a CI job meet binaries an earlier run analysed. The
content hash, not a build ID or a path, names the entry: a Go build ID proves nothing
about the bytes, and a site from another file could land inside an instruction.
Hashing a test binary from the fd that is judged costs a few milliseconds.

Entries are small JSON files in a directory only we can write (the same rule as the
BPF program cache: a planted file would place probes as root), replaced atomically,
validated when read (an entry that does not fit the file is a miss), and bounded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from goleash import cachefiles
from goleash.gobin.disasm import GoroutineProbeSites, ProbeSite
from goleash.probes.testleaks import CheckSites

log = logging.getLogger(__name__)

FORMAT = 3  # bump when what is stored, or how sites are chosen, changes
KEEP_ENTRIES = 512
MAX_ENTRY_BYTES = 64 << 10


Layout = tuple[int, "int | None", "int | None", tuple[str, ...]]
"""Where the runtime keeps its goroutines (probes.inventory.found_layout): allgs,
allglen, allgptr (link-time) and the wait reasons' names."""
MAX_WAIT_REASONS = 256
Started = tuple[tuple[str, "str | None"], ...]
"""`go f(x)` wrappers and the function each starts (probes.creation.started_functions)."""
MAX_STARTED = 4096


@dataclass(frozen=True)
class ExecPlan:
    """What a Go test binary needs while it waits at exec: its Go release and the
    sites of check.bpf.c's probes; and, once a run read its goroutines, where they
    are (finding that in a stripped test binary costs more than the rest)."""

    go_version: str
    sites: CheckSites
    layout: Layout | None = None
    started: Started | None = None  # known once a run read its goroutines


def cache_dir() -> Path:
    """Beside the BPF program cache (goleash.cachefiles: where, and what is trusted)."""
    return cachefiles.cache_dir("check")


def file_digest(fd: int) -> tuple[str, int]:
    """(SHA-256 hex, size) of the file open at FD, hashed in C from one mapping."""
    size = os.fstat(fd).st_size
    if size == 0:
        return hashlib.sha256(b"").hexdigest(), 0
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
        return hashlib.sha256(m).hexdigest(), size


def _entry(digest: str) -> Path:
    return cache_dir() / f"{digest}.json"


def _read(path: Path) -> Any:
    """The JSON in PATH when only we could have written it, else None."""
    try:
        data = cachefiles.read_trusted(path, MAX_ENTRY_BYTES)
    except OSError:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def load(digest: str, file_size: int) -> ExecPlan | None:
    """The plan stored for these bytes, or None (not stored, not trusted, not valid)."""
    raw = _read(_entry(digest))
    if raw is None:
        return None
    try:
        return _decode(raw, digest, file_size)
    except (ValueError, TypeError, KeyError) as exc:
        log.info("check site cache entry %s ignored: %s", digest, exc)
        return None


def store(digest: str, plan: ExecPlan) -> None:
    """Remember PLAN for these bytes; a cache that cannot be written is no error."""
    _write(_entry(digest), _encode(digest, plan))


def _write(path: Path, content: Any) -> None:
    try:
        cachefiles.write_atomic(path, json.dumps(content), KEEP_ENTRIES, "*.json")
    except OSError as exc:
        log.info("check site cache not written (%s)", exc)


# --- executables not to follow -------------------------------------------------------------
#
# The toolchain's tools are big (compile: 28 MB) and run every time: hashing them costs
# more than judging them. What is not followed is remembered by file identity instead
# (device, inode, size, mtime, ctime: ctime cannot be set back, and any write moves
# it); at worst a wrong entry leaves a program unchecked, never a probe misplaced.

FileIdentity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _skip_entry(ident: FileIdentity) -> Path:
    return cache_dir() / ("skip-" + "-".join(str(n) for n in ident) + ".json")


def load_skip(ident: FileIdentity) -> str | None:
    """Why the file with this identity is not followed, when a run judged it so."""
    raw = _read(_skip_entry(ident))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        return None
    reason = raw.get("skip")
    if not isinstance(reason, str) or not reason or len(reason) > 512:
        return None
    return reason


def store_skip(ident: FileIdentity, reason: str) -> None:
    _write(_skip_entry(ident), {"format": FORMAT, "skip": reason})


def _encode(digest: str, plan: ExecPlan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "digest": digest,
        "go_version": plan.go_version,
        "goroutines": asdict(plan.sites.goroutines),
        "trunner": asdict(plan.sites.trunner) if plan.sites.trunner else None,
        "process_exit": asdict(plan.sites.process_exit),
        "layout": list(plan.layout[:3]) + [list(plan.layout[3])] if plan.layout else None,
        "started": [list(pair) for pair in plan.started] if plan.started is not None else None,
    }


def _site(raw: Any, file_size: int) -> ProbeSite:
    if not isinstance(raw, dict) or set(raw) != {
        "symbol",
        "vaddr",
        "file_offset",
        "instruction",
        "emulated",
    }:
        raise ValueError("not a probe site")
    site = ProbeSite(**raw)
    for n in (site.vaddr, site.file_offset):
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 1 << 48:
            raise ValueError(f"bad address {n!r}")
    if site.file_offset >= file_size:
        raise ValueError(f"site at {site.file_offset:#x} is past the file's end")
    if not isinstance(site.symbol, str) or not isinstance(site.instruction, str):
        raise TypeError("bad site names")
    if not isinstance(site.emulated, bool):
        raise TypeError("bad site flag")
    return site


def _address(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < 1 << 48:
        raise ValueError(f"bad address {n!r}")
    return n


def _layout(raw: Any) -> Layout | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 4:
        raise ValueError("bad layout")
    allgs, allglen, allgptr, reasons = raw
    if not isinstance(reasons, list) or len(reasons) > MAX_WAIT_REASONS:
        raise ValueError("bad wait reasons")
    if not all(isinstance(r, str) and len(r) <= 256 and r.isprintable() for r in reasons):
        raise ValueError("bad wait reason")
    return (
        _address(allgs),
        None if allglen is None else _address(allglen),
        None if allgptr is None else _address(allgptr),
        tuple(reasons),
    )


def _name(raw: Any) -> str:
    if not isinstance(raw, str) or not 0 < len(raw) <= 1024 or not raw.isprintable():
        raise ValueError("bad function name")
    return raw


def _started(raw: Any) -> Started | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_STARTED:
        raise ValueError("bad started functions")
    out = []
    for pair in raw:
        if not isinstance(pair, list) or len(pair) != 2 or ".gowrap" not in _name(pair[0]):
            raise ValueError("bad started function")
        out.append((pair[0], None if pair[1] is None else _name(pair[1])))
    return tuple(out)


def _decode(raw: Any, digest: str, file_size: int) -> ExecPlan:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("digest") != digest:
        raise ValueError("another format or another file")
    go_version = raw["go_version"]
    if not isinstance(go_version, str) or not go_version.startswith("go"):
        raise ValueError("bad Go version")
    g = raw["goroutines"]
    if not isinstance(g, dict) or g.get("create_kind") not in ("runqput_call", "newproc1_ret"):
        raise ValueError("bad create kind")
    create = _site(g["create"], file_size) if g["create"] is not None else None
    rets = g["create_rets"]
    if not isinstance(rets, list) or len(rets) > 64:
        raise ValueError("bad return sites")
    gsites = GoroutineProbeSites(
        create_kind=g["create_kind"],
        create=create,
        create_rets=[_site(s, file_size) for s in rets],
        exit=_site(g["exit"], file_size),
        newproc_entry=_site(g["newproc_entry"], file_size),
        gopark=_site(g["gopark"], file_size),
        gopanic=_site(g["gopanic"], file_size),
    )
    if (gsites.create_kind == "runqput_call") != (create is not None) or not gsites.create_sites:
        raise ValueError("create sites do not match their kind")
    trunner = _site(raw["trunner"], file_size) if raw["trunner"] is not None else None
    exit_site = _site(raw["process_exit"], file_size)
    return ExecPlan(
        go_version,
        CheckSites(gsites, trunner, exit_site),
        _layout(raw["layout"]),
        _started(raw["started"]),
    )
