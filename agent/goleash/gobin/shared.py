"""One analysis per executable file, shared by every process running it.

A node runs many processes of one binary (replicas, workers, restarts). Analysing
an executable (build info, symbols, offsets from DWARF, pclntab) costs up to half a
CPU-second and megabytes of Python objects, so it is done once per file version
(device, inode, size, mtime: `GoBinary.key`) and handed to every process that runs
that file. Per-process facts (load bias, memory, start time) are not kept here.

An entry lives while some process uses it: `release` by its last user closes the
binary and drops the entry, so months of process churn leave nothing behind. A user
that is dropped without `release` does not pin it either: entries are held weakly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from dataclasses import dataclass, field

from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo
from goleash.gobin.offsets import RuntimeOffsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.report import analyze
from goleash.gobin.symbols import SymbolTable

FileKey = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)


@dataclass(eq=False)
class Analysis:
    """Everything read from one executable file, shared by its processes."""

    binary: GoBinary
    build_info: BuildInfo
    symbols: SymbolTable
    offsets: RuntimeOffsets
    pclntab: Pclntab
    users: int = field(default=0, repr=False)

    @property
    def key(self) -> FileKey:
        return self.binary.key


class AnalysisCache:
    """Analyses by file version, each kept while a process uses it."""

    def __init__(self) -> None:
        self._entries: weakref.WeakValueDictionary[FileKey, Analysis] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        self.analyses = 0  # files analysed (a shared hit is not counted)

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
            info, symbols, offsets, pclntab = analyze(binary)
        except BaseException:
            binary.close()
            raise
        binary.release_pages()  # analysis done: later reads fault in only what they need
        _return_freed_memory()
        made = Analysis(binary, info, symbols, offsets, pclntab, users=1)
        with self._lock:
            self.analyses += 1
            found = self._entries.get(binary.key)
            if found is None:
                self._entries[binary.key] = made
                return made
            found.users += 1  # another thread analysed it meanwhile: use theirs
        binary.close()
        return found

    def release(self, analysis: Analysis) -> None:
        """A user is done with `analysis`; the last one closes the file."""
        with self._lock:
            analysis.users -= 1
            if analysis.users > 0:
                return
            if self._entries.get(analysis.key) is analysis:
                del self._entries[analysis.key]
        analysis.binary.close()

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
