"""Where a goroutine comes from: its creation site (the function it started with and
the `go` statement that started it), symbolized as the runtime's tracebacks name
them, once per (gopc, startpc) and executable; and whether the runtime started it
for itself."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from goleash.gobin.binary import GoBinary
from goleash.gobin.disasm import disassemble
from goleash.gobin.pclntab import Func, SourceLine
from goleash.probes.inventory import Goroutine
from goleash.probes.target import GoProcess


@dataclass(frozen=True)
class CreationSite:
    function: str  # the function the goroutine started with (startpc)
    go_statement: str  # "file:line" of the `go` statement (gopc); "" for goroutine 1
    created_by: str  # the function holding the `go` statement, as "created by" names it


class _SiteCache:
    def __init__(self) -> None:
        self.sites: dict[tuple[int, int], CreationSite] = {}
        # `go f(x)` wrapper name -> the function it starts (None: none found): a
        # disassembly each, and the only one reading a goroutine's site needs.
        self.started: dict[str, str | None] = {}


def started_functions(binary: GoBinary) -> dict[str, str | None]:
    """The wrappers' started functions found (or given) for BINARY so far, by wrapper
    name: a caller that analysed the same bytes before may fill it (it then reads
    sites without a disassembler), or keep it for next time."""
    cache = _site_caches.get(binary)
    if cache is None:
        cache = _site_caches[binary] = _SiteCache()
    return cache.started


_site_caches: weakref.WeakKeyDictionary[GoBinary, _SiteCache] = weakref.WeakKeyDictionary()


def _started_function(proc: GoProcess, wrapper: Func) -> str | None:
    """The user's function behind a `go f(x)` wrapper (Go 1.21+ compiles such a
    statement to a closure `caller.gowrapN` that calls f): its first direct call to
    a non-runtime function, as the first frame of a traceback would show it."""
    for ins in disassemble(proc.binary, wrapper.entry, wrapper.end - wrapper.entry):
        if ins.mnemonic != "call" or ins.target is None:
            continue
        callee = proc.pclntab.func_for_pc(ins.target)
        if callee is not None and not callee.name.startswith("runtime."):
            return callee.name
    return None


def site_at(proc: GoProcess, gopc: int, startpc: int) -> CreationSite:
    """The creation site of (gopc, startpc), link-time addresses, symbolized as the
    runtime does: gopc is the return address after the CALL to newproc, so its line
    is that of gopc - 1 (traceback.go printcreatedby1), its function the one holding
    gopc. A `go f(x)` starts a compiler wrapper; the site names f."""
    cache = _site_caches.get(proc.binary)
    if cache is None:
        cache = _site_caches[proc.binary] = _SiteCache()
    key = (gopc, startpc)
    site = cache.sites.get(key)
    if site is None:
        tab = proc.pclntab
        start = tab.func_for_pc(startpc)
        function = start.name if start else f"{startpc:#x}"
        if start is not None and ".gowrap" in start.name:
            if start.name not in cache.started:
                cache.started[start.name] = _started_function(proc, start)
            function = cache.started[start.name] or function
        # Goroutine 1 (runtime.main) is started by the assembly of rt0_go, not by a go
        # statement: the runtime prints no "created by" for it, and neither do we.
        call: SourceLine | None = (
            tab.call_site(gopc) if gopc and function != "runtime.main" else None
        )
        site = CreationSite(
            function=function,
            go_statement=f"{call.file}:{call.line}" if call else "",
            created_by=call.function if call else "",
        )
        cache.sites[key] = site
    return site


def creation_site_of(proc: GoProcess, g: Goroutine) -> CreationSite:
    return site_at(proc, g.gopc, g.startpc)


def creation_site(proc: GoProcess, g: Goroutine) -> tuple[str, str]:
    """(started function, "file:line" of the go statement): the site goroutines are
    counted by. Goroutine 1 (runtime.main) has no go statement: ""."""
    site = creation_site_of(proc, g)
    return site.function, site.go_statement


SYSTEM_KEEP = frozenset({"runtime.main", "runtime.handleAsyncEvent", "runtime.corostart"})


def is_system_goroutine(proc: GoProcess, g: Goroutine) -> bool:
    """A goroutine the runtime started for itself (GC workers, finalizers, ...), which
    runtime.Stack and pprof leave out: traceback.go isSystemGoroutine without its
    live finalizer check (the finalizer/cleanup goroutines count as system)."""
    name = creation_site_of(proc, g).function
    return name.startswith("runtime.") and name not in SYSTEM_KEEP
