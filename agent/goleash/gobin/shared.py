"""One analysis per executable file, shared by every process running it.

A node runs many processes of one binary (replicas, workers, restarts). Analysing
an executable (build info, symbols, offsets from DWARF, pclntab) costs up to half a
CPU-second and megabytes of Python objects, so it is done once per file version
(device, inode, size, mtime: `GoBinary.key`) and handed to every process that runs
that file. Per-process facts (load bias, memory, start time) are not kept here.

Copies of one executable (a container image's layers give the same file another
device and inode in every container; a binary copied to two paths) are one analysis
too: what was read from the bytes is shared by content, named by the SHA-256 of the
whole file. A Go build ID names a build but proves nothing (`-buildid=` sets any,
two different files can carry the same one), and a probe placed from another file's
analysis could land inside an instruction, so the content hash, not the build ID,
decides. Each inode keeps its own open GoBinary: probes attach to, and processes
are checked against, the very inode they run. A copy also gets its own Pclntab (a
view of its own mapping, milliseconds to make): one file rewritten in place once
its processes are gone must not change what another file's processes read.

An entry lives while some process uses it: `release` by its last user closes the
binary and drops the entry, so months of process churn leave nothing behind. A user
that is dropped without `release` does not pin it either: entries are held weakly.
Not all of it goes with the last reference, though: pyelftools' ELF and DWARF
objects refer to each other, so they, the debug sections they decompressed, and the
file's mapping and descriptor behind them wait for the cyclic garbage collector.
`dropped` counts the analyses made or dropped, for the agent to collect after them
(node/reclaim.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo
from goleash.gobin.offsets import RuntimeOffsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.report import analyze
from goleash.gobin.symbols import SymbolTable, symbol_table

FileKey = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)


@dataclass(eq=False)
class Content:
    """What analysis read from an executable's bytes: the same for every copy."""

    digest: bytes  # SHA-256 of the whole file
    build_info: BuildInfo
    symbols: SymbolTable
    offsets: RuntimeOffsets
    pclntab: Pclntab
    # Later results computed from the same bytes (probe sites: gobin.disasm), shared
    # by every copy through GoBinary.memo.
    memo: dict[str, Any] = field(default_factory=dict, repr=False)
    first: weakref.ref[GoBinary] | None = field(default=None, repr=False)


@dataclass(eq=False)
class Analysis:
    """Everything read from one executable file, shared by its processes."""

    binary: GoBinary
    build_info: BuildInfo
    symbols: SymbolTable
    offsets: RuntimeOffsets
    pclntab: Pclntab
    users: int = field(default=0, repr=False)
    content: Content | None = field(default=None, repr=False)  # keeps it shared

    @property
    def key(self) -> FileKey:
        return self.binary.key

    @classmethod
    def of(cls, binary: GoBinary, content: Content) -> Analysis:
        binary.memo = content.memo
        symbols, pclntab = content.symbols, content.pclntab
        if content.first is None or content.first() is not binary:  # a copy
            pclntab = Pclntab.from_binary(binary)
            if symbols.source == "pclntab":  # functions from the pclntab: its own
                symbols = symbol_table(binary)
        return cls(
            binary,
            content.build_info,
            symbols,
            content.offsets,
            pclntab,
            users=1,
            content=content,
        )


def file_digest(binary: GoBinary) -> bytes:
    """SHA-256 of the whole file, from the one mapping everything else is read from
    (hashlib releases the GIL on large buffers; ~10 ms for a 10 MB binary)."""
    return hashlib.sha256(binary.data).digest()


class AnalysisCache:
    """Analyses by file version, each kept while a process uses it."""

    def __init__(self) -> None:
        self._entries: weakref.WeakValueDictionary[FileKey, Analysis] = (
            weakref.WeakValueDictionary()
        )
        self._contents: weakref.WeakValueDictionary[bytes, Content] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.analyses = 0  # files analysed (a shared hit is not counted)
        self.copies_shared = 0  # another inode with the same bytes: not analysed again
        # Analyses made or dropped: each leaves garbage in reference cycles (see
        # `dropped`), which the agent collects when this changes (node/reclaim.py).
        self.dropped = 0

    def acquire(self, path: str | os.PathLike[str]) -> Analysis:
        """The analysis of the file `path` names now, shared when another user holds
        it. The file is opened once here and judged by that descriptor's key, so an
        exec or a replaced file is a new key, never a stale analysis. Raises what
        GoBinary and analyze raise (BinaryError and its subclasses)."""
        binary = GoBinary(path)
        with self._lock:
            found = self._entries.get(binary.key)
            if found is not None:
                found.users += 1
        if found is not None:
            binary.close()  # the shared one holds the same inode open
            return found
        try:
            made = self._analyse(binary)
        except BaseException:
            binary.close()
            raise
        with self._lock:
            found = self._entries.get(binary.key)
            if found is None:
                self._entries[binary.key] = made
                return made
            found.users += 1  # another thread analysed it meanwhile: use theirs
        binary.close()
        return found

    def _analyse(self, binary: GoBinary) -> Analysis:
        """BINARY's analysis: another copy's when the bytes are the same, else new."""
        digest = file_digest(binary)
        with self._lock:
            content = self._contents.get(digest)
            if content is not None:
                self.copies_shared += 1
        if content is None:
            info, symbols, offsets, pclntab = analyze(binary)
            binary.release_pages()  # analysis done: later reads fault in what they need
            _return_freed_memory()
            content = Content(digest, info, symbols, offsets, pclntab, first=weakref.ref(binary))
            with self._lock:
                self.analyses += 1
                self.dropped += 1  # the DWARF objects the analysis read
                content = self._contents.setdefault(digest, content)
        return Analysis.of(binary, content)

    def release(self, analysis: Analysis) -> None:
        """A user is done with `analysis`; the last one closes the file."""
        with self._lock:
            analysis.users -= 1
            if analysis.users > 0:
                return
            if self._entries.get(analysis.key) is analysis:
                del self._entries[analysis.key]
            self.dropped += 1
        analysis.binary.close()

    def release_pages(self) -> None:
        """Drop the pages of every open executable from this process's resident
        set (binary.release_pages): what symbolizing read of pclntab and stacks
        stays in the page cache, and the next reads fault in only what they need."""
        with self._lock:
            binaries = [a.binary for a in self._entries.values()]
        for b in binaries:
            b.release_pages()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def _return_freed_memory() -> None:
    """Hand the heap a DWARF parse left behind back to the system: glibc keeps it
    otherwise (measured: 21 analyses left ~80 MB of freed heap resident)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# The agent's one cache: every GoProcess.attach goes through it.
SHARED = AnalysisCache()
