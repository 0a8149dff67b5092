"""Reading a Go binary without running it: the function list of a stripped binary
(pclntab) against the ELF symbol table of the same program unstripped, in one run.
(The tests check the list is complete; how long it takes is a figure, here.)"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from goleash.bench import Report, fixture
from goleash.gobin.binary import GoBinary
from goleash.gobin.pclntab import Pclntab

TOOLCHAIN = os.environ.get("GOLEASH_BENCH_GO", "1.27.3")
REPEATS = 5


def _median_s(fn: Callable[[], int]) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def run(report: Report) -> None:
    stripped = fixture("populations", TOOLCHAIN, "stripped")
    full = fixture("populations", TOOLCHAIN)

    def from_pclntab() -> int:
        with GoBinary(stripped) as b:
            return len(Pclntab.from_binary(b).functions)

    def from_symtab() -> int:
        with GoBinary(full) as b:
            return sum(1 for _ in b.elf_symbols)

    pcln_s, n_funcs = _median_s(from_pclntab)
    sym_s, n_syms = _median_s(from_symtab)
    report.line("toolchain", float(TOOLCHAIN.split(".")[1]), "go1.N", f"go{TOOLCHAIN}")
    report.line("stripped binary: function list from pclntab", pcln_s * 1e3, "ms",
                f"{n_funcs} functions")  # fmt: skip
    report.line("unstripped: ELF symbol table", sym_s * 1e3, "ms", f"{n_syms} symbols")
    report.line("pclntab function list / ELF symbol table", pcln_s / sym_s, "x")
