"""Panics in one Go process, recovered or not: a uprobe on runtime.gopanic counts them
per call site (the caller's frames, by frame pointers), in funclat.bpf.c's fl_panics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from goleash.probes.funcprog import LatencyProgram
from goleash.probes.funcsites import FuncProbeError, runtime_site
from goleash.probes.target import GoProcess

DEFAULT_MAX_PANIC_SITES = 1024


@dataclass(frozen=True)
class PanicSite:
    function: str  # the first function outside the runtime: the one that panicked
    file: str | None
    line: int | None
    count: int
    frames: tuple[str, ...]  # caller of gopanic first (runtime frames included)


@dataclass
class PanicReading:
    total: int
    sites: list[PanicSite]

    def by_function(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.function] = out.get(s.function, 0) + s.count
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "functions": [
                {"function": fn, "count": n}
                for fn, n in sorted(self.by_function().items(), key=lambda kv: -kv[1])
            ],
            "sites": [
                {
                    "function": s.function,
                    "file": s.file,
                    "line": s.line,
                    "count": s.count,
                    "frames": list(s.frames),
                }
                for s in sorted(self.sites, key=lambda s: -s.count)
            ],
        }


class PanicProbes:
    """Panics in one process, recovered or not: a uprobe on runtime.gopanic."""

    def __init__(self, proc: GoProcess, *, max_sites: int = DEFAULT_MAX_PANIC_SITES) -> None:
        self.proc = proc
        self.max_sites = max_sites
        self.site, self.sp_adj = runtime_site(proc, "runtime.gopanic", ("r14",))
        self._prog: LatencyProgram | None = None

    def attach(self) -> None:
        if self._prog is not None:
            return
        self._prog = LatencyProgram(
            self.proc,
            [],
            max_goroutines=1,
            max_panic_sites=self.max_sites,
            panic_sp_adj=self.sp_adj,
        )
        try:
            self._prog.attach("panic", [self.site], "fl_panic")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._prog is not None:
            self._prog.close()
            self._prog = None

    def __enter__(self) -> PanicProbes:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self) -> PanicReading:
        """Counts since attach."""
        if self._prog is None:
            raise FuncProbeError("read() before attach()")
        tab = self.proc.pclntab
        bias = self.proc.load_bias
        sites: list[PanicSite] = []
        for k, v in self._prog.bpf["fl_panics"].items():
            pcs: list[int] = []
            for pc in k.pcs:
                # Where gopanic's probe sits past its frame set-up (Go 1.19), the
                # frame-pointer walk repeats the caller: keep each frame once.
                if pc and (not pcs or pcs[-1] != pc - bias):
                    pcs.append(int(pc) - bias)
            names = []
            for pc in pcs:
                fn = tab.func_for_pc(pc - 1)
                names.append(fn.name if fn is not None else f"{pc:#x}")
            pick = next((i for i, n in enumerate(names) if not n.startswith("runtime.")), 0)
            src = tab.call_site(pcs[pick]) if pcs else None
            sites.append(
                PanicSite(
                    function=names[pick] if names else "?",
                    file=src.file if src else None,
                    line=src.line if src else None,
                    count=int(v.value),
                    frames=tuple(names),
                )
            )
        total = self._prog.counters()["panic_hits"]
        return PanicReading(total, _merge_sites(sites))


def _merge_sites(sites: list[PanicSite]) -> list[PanicSite]:
    """Sites recorded with different deeper frames but the same panicking line are one."""
    merged: dict[tuple[str, str | None, int | None], PanicSite] = {}
    for s in sites:
        key = (s.function, s.file, s.line)
        old = merged.get(key)
        merged[key] = s if old is None else PanicSite(*key, old.count + s.count, old.frames)
    return list(merged.values())
