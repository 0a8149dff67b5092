"""`goleash check`'s judgment of one executable (once per inode): a Go program to
trace, with what its probes need, or why not; and, once its process runs again,
the analysis its goroutines are read with."""

from __future__ import annotations

import os
from dataclasses import dataclass

from goleash.errors import GoleashError
from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo, check_supported, read_build_info
from goleash.gobin.disasm import (
    CreateKind,
    GoroutineProbeSites,
    ProbeSite,
    SymbolLookup,
    call_sites,
    emulated_entry_site,
    entry_site,
    return_sites,
)
from goleash.gobin.errors import BinaryError, SymbolNotFoundError
from goleash.gobin.offsets import RuntimeOffsets, table_offsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.symbols import SymbolTable, symbol_table
from goleash.node import checksites
from goleash.node.checksites import ExecPlan
from goleash.probes.inventory import use_layout
from goleash.probes.testleaks import CheckSites

# Judgments that hold for the path exec'd for the whole run (the toolchain's tools,
# shells, the gate script): a `cannot trace` can be a passing fault.
STABLE_SKIPS = ("not a Go program", "Go toolchain")


# --- one executable, judged once per inode ------------------------------------------------
#
# A test binary waits stopped at exec until its probes are attached, so only what the
# probes need is done then (its Go release, the probe sites: from the content-hash
# cache when an earlier run analysed the same bytes); what reading its goroutines at
# exit needs (pclntab, symbols, the process's mappings) is read once it runs again.


@dataclass
class Analysis:
    binary: GoBinary
    info: BuildInfo
    pclntab: Pclntab
    symbols: SymbolTable


@dataclass
class Judged:
    skip: str  # why it is not traced ("" when it is)
    plan: ExecPlan | None = None
    offsets: RuntimeOffsets | None = None
    fd: int | None = None  # the file judged, open until analysed
    digest: str = ""  # its SHA-256, the key of its plan in checksites
    analysis: Analysis | None = None
    error: str = ""  # why it could not be analysed after its exec
    warmed: bool = False

    def analyse(self) -> Analysis:
        """The executable's analysis for reading its processes, from the very file the
        probes were placed from (the fd judged)."""
        if self.analysis is not None:
            return self.analysis
        if self.error:
            raise BinaryError(self.error)
        assert self.plan is not None and self.fd is not None
        try:
            binary = GoBinary(f"/proc/self/fd/{self.fd}")
            try:
                info = read_build_info(binary)
                if info.go_version != self.plan.go_version:
                    raise BinaryError(
                        f"built with {info.go_version}, judged {self.plan.go_version}"
                    )
                symbols = symbol_table(binary)
                # A stripped binary's symbols are its pclntab's functions: one Pclntab.
                tab = symbols._pclntab or Pclntab.from_binary(binary)
                self.analysis = Analysis(binary, info, tab, symbols)
                if self.plan.layout is not None:
                    use_layout(binary, *self.plan.layout)
            except BaseException:
                binary.close()
                raise
        except (BinaryError, GoleashError) as exc:
            self.error = str(exc)
            raise
        finally:
            os.close(self.fd)
            self.fd = None
        return self.analysis

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.analysis is not None:
            self.analysis.binary.close()


def judge(fd: int) -> Judged:
    """Judge the executable open at FD: a Go program to trace (its plan), or why not."""
    path = f"/proc/self/fd/{fd}"
    try:
        ident = checksites.identity(os.fstat(fd))
    except OSError as exc:
        return Judged(f"cannot read: {exc}")
    skip = checksites.load_skip(ident)
    if skip is not None:
        return Judged(skip)
    try:
        digest, size = checksites.file_digest(fd)
    except (OSError, ValueError) as exc:
        return Judged(f"cannot read: {exc}")
    plan = checksites.load(digest, size)
    if plan is None:
        try:
            binary = GoBinary(path)
        except BinaryError:
            plan_or_skip: ExecPlan | str = "not a Go program"
        else:
            try:
                plan_or_skip = plan_for(binary)
            finally:
                binary.close()
        if isinstance(plan_or_skip, str):
            if plan_or_skip.startswith(STABLE_SKIPS):
                checksites.store_skip(ident, plan_or_skip)
            return Judged(plan_or_skip)
        plan = plan_or_skip
        checksites.store(digest, plan)
    try:
        offsets = table_offsets(plan.go_version)
    except (BinaryError, GoleashError) as exc:
        return Judged(f"cannot trace: {exc}")
    return Judged("", plan, offsets, digest=digest)


def plan_for(binary: GoBinary) -> ExecPlan | str:
    """What the probes need from BINARY, or why it is not traced."""
    try:
        info = read_build_info(binary)
    except BinaryError:
        return "not a Go program"
    if (info.main_package or "").startswith("cmd/"):
        return f"Go toolchain ({info.main_package})"
    try:
        check_supported(info)
        table_offsets(info.go_version)
        sites = check_sites(binary, symbol_table(binary).lookup)
    except (BinaryError, GoleashError) as exc:
        return f"cannot trace: {exc}"
    return ExecPlan(info.go_version, sites)


def check_sites(binary: GoBinary, lookup: SymbolLookup) -> CheckSites:
    """The four sites check.bpf.c needs, and only those: a test binary is analysed
    while it waits stopped at its first instruction, so every millisecond counts."""

    def need(name: str) -> tuple[int, int]:
        found = lookup(name)
        if found is None:
            raise SymbolNotFoundError(f"{binary.path}: no {name}")
        return found

    create: list[ProbeSite] = []
    closure, runqput = lookup("runtime.newproc.func1"), lookup("runtime.runqput")
    if closure is not None and runqput is not None:
        calls = call_sites(binary, "runtime.newproc.func1", *closure, target=runqput[0])
        if len(calls) == 1:
            create = calls
    kind: CreateKind = "runqput_call" if create else "newproc1_ret"
    rets: list[ProbeSite] = []
    if not create:
        rets = return_sites(binary, "runtime.newproc1", *need("runtime.newproc1"))
    exit_site = emulated_entry_site(binary, "runtime.goexit1", *need("runtime.goexit1"))
    gsites = GoroutineProbeSites(
        create_kind=kind,
        create=create[0] if create else None,
        create_rets=rets,
        exit=exit_site,
        newproc_entry=exit_site,  # not used by check.bpf.c
        gopark=exit_site,  # not used
        gopanic=exit_site,  # not used
    )
    tr = lookup("testing.tRunner")
    trunner = (
        emulated_entry_site(binary, "testing.tRunner", *tr, keep=("r14", "rbx")) if tr else None
    )
    pexit = entry_site(binary, "runtime.exit", *need("runtime.exit"))
    return CheckSites(gsites, trunner, pexit)
