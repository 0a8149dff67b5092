"""Hand the BPF compiler's code back to the kernel once a compile is done.

BCC compiles with LLVM and clang, linked into the agent: ~85 MB of their code and
read-only data stay resident after the one compile an agent makes (measured: 55 MB
libLLVM, 28 MB libclang-cpp), though nothing runs them until the next compile.

Only mappings that hold nothing but the file's own bytes are touched: read-only
or executable, private, and without a single anonymous (copied-on-write) page, as
/proc/self/smaps says. For those, MADV_PAGEOUT evicts the pages no other process
maps, and MADV_DONTNEED drops the rest from the agent (they stay in the page cache,
shared and reclaimable); whatever a later compile needs faults back in from the
file, identical. A mapping the loader wrote (relocations: RELRO) has anonymous
pages and is left alone: dropping those would lose what was written.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("goleash.agent")

MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4+; EINVAL before (DONTNEED still applies)
# Libraries that only compiling uses (Debian's BCC links LLVM and clang shared).
COMPILER_LIBRARIES = ("libLLVM", "libclang-cpp", "libclang")


@dataclass(frozen=True)
class Mapping:
    start: int
    length: int
    perms: str
    path: str
    anonymous_kb: int  # pages copied on write: the mapping no longer equals the file


def parse_smaps(text: str) -> list[Mapping]:
    out: list[Mapping] = []
    head: tuple[int, int, str, str] | None = None
    anon = -1
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            if head is not None:
                out.append(Mapping(*head, anon))
            try:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
            except ValueError:
                head = None
                continue
            head, anon = (lo, hi - lo, parts[1], parts[5].strip() if len(parts) > 5 else ""), -1
        elif parts and parts[0] == "Anonymous:" and len(parts) >= 2 and parts[1].isdigit():
            anon = int(parts[1])
    if head is not None:
        out.append(Mapping(*head, anon))
    return out


def droppable(m: Mapping) -> bool:
    """A compiler library's mapping that holds only the file's bytes."""
    name = os.path.basename(m.path)
    return (
        name.startswith(COMPILER_LIBRARIES)
        and ".so" in name
        and m.perms in ("r-xp", "r--p")
        and m.anonymous_kb == 0  # -1 (not reported): unknown, so not touched
        and m.length > 0
    )


def drop_compiler_pages() -> int:
    """Drop the compiler libraries' clean pages from the agent; the bytes of the
    mappings treated (0 when there are none or the kernel refuses)."""
    try:
        smaps = Path("/proc/self/smaps").read_text()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    done = 0
    for m in parse_smaps(smaps):
        if not droppable(m):
            continue
        with contextlib.suppress(OSError):
            madvise(m.start, m.length, MADV_PAGEOUT)  # evicts what only the agent maps
            if madvise(m.start, m.length, MADV_DONTNEED) == 0:
                done += m.length
    if done:
        log.debug("compiler libraries: %d MB of clean mappings dropped", done >> 20)
    return done
