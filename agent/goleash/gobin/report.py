"""`goleash inspect`: everything goleash reads from one Go binary, as one record.

The report is what the probes will use (offsets, attach sites), so inspect is also
the quickest way to learn whether goleash can trace a binary at all: whatever would
make tracing fail (not Go, Go < 1.17, stripped with an unknown version) fails here
with the same error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo, check_supported, read_build_info
from goleash.gobin.disasm import ProbeSite, function_probes, goroutine_probe_sites
from goleash.gobin.errors import parse_guard
from goleash.gobin.offsets import RuntimeOffsets, runtime_offsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.symbols import SymbolTable, symbol_table

# The runtime functions the goroutine and panic probes use. newproc1 is listed with
# its RETs: the fallback creation probe when newproc's closure has no runqput call.
PROBED_FUNCTIONS = (
    "runtime.newproc",
    "runtime.newproc1",
    "runtime.goexit1",
    "runtime.gopark",
    "runtime.gopanic",
)
NEEDS_RETURN_PROBE = {"runtime.newproc1"}


@dataclass(frozen=True)
class SiteRecord:
    vaddr: int
    file_offset: int
    instruction: str
    emulated: bool

    @classmethod
    def of(cls, site: ProbeSite) -> SiteRecord:
        return cls(site.vaddr, site.file_offset, site.instruction, site.emulated)


@dataclass(frozen=True)
class FunctionRecord:
    symbol: str
    address: int
    file_offset: int
    probe: SiteRecord  # where goleash attaches: after the stack check, on an emulated insn
    rets: list[SiteRecord] | None  # only for functions that need a return probe


@dataclass
class InspectReport:
    path: str
    go_version: str
    main_module: str | None
    build_settings: dict[str, str]
    buildmode: str
    cgo: bool
    trimpath: bool
    pie: bool
    stripped: bool
    has_symtab: bool
    has_dwarf: bool
    symbols_source: str
    offsets: dict[str, int | None]
    offsets_source: str
    probes: dict[str, FunctionRecord]
    goroutine_create: dict[str, Any]
    goroutine_exit: SiteRecord
    pid: int | None = None
    load_bias: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _offsets_dict(off: RuntimeOffsets) -> dict[str, int | None]:
    return {k: v for k, v in asdict(off).items() if k not in ("source", "go_version")}


@parse_guard
def analyze(binary: GoBinary) -> tuple[BuildInfo, SymbolTable, RuntimeOffsets, Pclntab]:
    """The checks every tracer runs first; raises the user-facing errors."""
    info = read_build_info(binary)
    check_supported(info)
    syms = symbol_table(binary)
    offsets = runtime_offsets(binary, info.go_version)
    return info, syms, offsets, Pclntab.from_binary(binary)


@parse_guard
def inspect_binary(binary: GoBinary) -> InspectReport:
    info, syms, offsets, _ = analyze(binary)
    sites = goroutine_probe_sites(binary, syms.lookup)
    # The goroutine and panic probes read argument registers as well as R14: their
    # sites come from goroutine_probe_sites, which keeps those intact.
    chosen = {
        "runtime.newproc": sites.newproc_entry,
        "runtime.goexit1": sites.exit,
        "runtime.gopark": sites.gopark,
        "runtime.gopanic": sites.gopanic,
    }
    probes: dict[str, FunctionRecord] = {}
    for name in PROBED_FUNCTIONS:
        addr, size = syms.require(name)
        fp = function_probes(binary, name, addr, size)
        probes[name] = FunctionRecord(
            symbol=name,
            address=fp.entry,
            file_offset=fp.entry_file_offset,
            probe=SiteRecord.of(chosen.get(name, fp.entry_probe)),
            rets=[SiteRecord.of(r) for r in fp.rets] if name in NEEDS_RETURN_PROBE else None,
        )
    create: dict[str, Any] = {"kind": sites.create_kind}
    if sites.create is not None:
        create.update(symbol=sites.create.symbol, **asdict(SiteRecord.of(sites.create)))
    else:
        create["rets"] = [asdict(SiteRecord.of(r)) for r in sites.create_rets]
    stripped = not binary.has_symtab and not binary.has_dwarf
    return InspectReport(
        path=str(binary.path),
        go_version=info.go_version,
        main_module=info.main_module,
        build_settings=dict(info.settings),
        buildmode=info.buildmode,
        cgo=info.cgo,
        trimpath=info.trimpath,
        pie=binary.is_pie,
        stripped=stripped,
        has_symtab=binary.has_symtab,
        has_dwarf=binary.has_dwarf,
        symbols_source=syms.source,
        offsets=_offsets_dict(offsets),
        offsets_source=offsets.source,
        probes=probes,
        goroutine_create=create,
        goroutine_exit=SiteRecord.of(sites.exit),
    )


def inspect_path(path: str) -> InspectReport:
    with GoBinary(path) as binary:
        return inspect_binary(binary)


@dataclass(frozen=True)
class SymbolizedPC:
    pc: int
    function: str | None
    file: str | None
    line: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@parse_guard
def symbolize(path: str, pcs: list[int]) -> list[SymbolizedPC]:
    with GoBinary(path) as binary:
        read_build_info(binary)
        tab = Pclntab.from_binary(binary)
        out = []
        for pc in pcs:
            sl = tab.source_line(pc)
            out.append(
                SymbolizedPC(pc, sl.function, sl.file, sl.line)
                if sl
                else SymbolizedPC(pc, None, None, None)
            )
        return out


def _hex(v: int | None) -> str:
    return "-" if v is None else f"{v:#x}"


def render_text(r: InspectReport) -> str:
    yes = {True: "yes", False: "no"}
    lines = [
        f"{r.path}" + (f" (PID {r.pid}, load bias {_hex(r.load_bias)})" if r.pid else ""),
        f"  Go version      {r.go_version}",
        f"  main module     {r.main_module or '-'}",
        f"  build           -buildmode={r.buildmode} CGO={'on' if r.cgo else 'off'}"
        f" trimpath={yes[r.trimpath]} pie={yes[r.pie]}",
        f"  stripped        {yes[r.stripped]} (symtab {yes[r.has_symtab]},"
        f" DWARF {yes[r.has_dwarf]}); symbols from {r.symbols_source}",
        f"  g offsets ({r.offsets_source})",
    ]
    for k, v in r.offsets.items():
        lines.append(f"    {k:<22} {'-' if v is None else v}")
    lines.append("  probe sites (link-time address, file offset, instruction)")
    for f in r.probes.values():
        ac = f.probe
        kind = "emulated" if ac.emulated else "single-stepped"
        lines.append(
            f"    {f.symbol:<18} entry {_hex(f.address)}  probe {_hex(ac.vaddr)} "
            f"@{ac.file_offset:#x} `{ac.instruction}` ({kind})"
        )
        if f.rets is not None:
            rets = ", ".join(f"{x.file_offset:#x}" for x in f.rets)
            lines.append(f"    {'':<18} RETs at {rets}")
    c = r.goroutine_create
    if c.get("kind") == "runqput_call":
        lines.append(
            f"  goroutine create: `call runtime.runqput` in {c['symbol']} at {c['vaddr']:#x} "
            f"@{c['file_offset']:#x} (new g in RBX)"
        )
    else:
        lines.append(f"  goroutine create: RETs of runtime.newproc1 ({c.get('kind')})")
    e = r.goroutine_exit
    lines.append(f"  goroutine exit:   `{e.instruction}` in runtime.goexit1 @{e.file_offset:#x}")
    return "\n".join(lines) + "\n"
