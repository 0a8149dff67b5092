"""Byte offsets of the Go runtime's `g` and `m` fields that the probes and memory reads use.

DWARF is the truth: when the binary has it, the offsets are read from the
`runtime.g` and `runtime.m` struct types. A stripped binary has none, so the offsets
come from `offsets_table.json`, one row per Go release line (`go1.22`), generated
from the DWARF of a real toolchain build (`make offsets-table`) and checked against
DWARF by the tests. The runtime's struct layouts do not change within a release line.
A version that neither gives is an error: a wrong offset reads garbage silently.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

from elftools.dwarf.die import DIE
from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo

from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import OffsetsUnavailableError, parse_guard

TABLE_PATH = Path(__file__).with_name("offsets_table.json")


@dataclass(frozen=True)
class RuntimeOffsets:
    """Offsets in bytes from the start of a `runtime.g` / `runtime.m`."""

    g_goid: int
    g_parent_goid: int | None  # g.parentGoid exists since Go 1.21
    g_gopc: int
    g_startpc: int
    g_atomicstatus: int
    g_waitreason: int
    g_waitsince: int
    g_sched_sp: int
    g_sched_pc: int
    g_sched_bp: int
    g_stack_lo: int
    g_stack_hi: int
    g_m: int
    g_syscallsp: int
    g_syscallpc: int
    m_curg: int
    m_g0: int
    g_waitreason_size: int
    g_atomicstatus_size: int
    source: Literal["dwarf", "table"]
    go_version: str

    def as_row(self) -> dict[str, int | None]:
        """The offsets alone, as a table row stores them (no source, no version)."""
        row = asdict(self)
        del row["source"], row["go_version"]
        return row


OFFSET_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(RuntimeOffsets) if f.name not in ("source", "go_version")
)

# RuntimeOffsets field -> member path in runtime.g; a dotted path walks into nested
# structs (g.sched is a runtime.gobuf, g.stack a runtime.stack).
_G_MEMBERS: dict[str, str] = {
    "g_goid": "goid",
    "g_parent_goid": "parentGoid",
    "g_gopc": "gopc",
    "g_startpc": "startpc",
    "g_atomicstatus": "atomicstatus",
    "g_waitreason": "waitreason",
    "g_waitsince": "waitsince",
    "g_sched_sp": "sched.sp",
    "g_sched_pc": "sched.pc",
    "g_sched_bp": "sched.bp",
    "g_stack_lo": "stack.lo",
    "g_stack_hi": "stack.hi",
    "g_m": "m",
    "g_syscallsp": "syscallsp",
    "g_syscallpc": "syscallpc",
}
_M_MEMBERS: dict[str, str] = {"m_curg": "curg", "m_g0": "g0"}
_OPTIONAL = {"g_parent_goid"}  # absent before Go 1.21: None, not an error

_RELEASE = re.compile(r"^go(\d+)\.(\d+)")


def go_release(go_version: str) -> str | None:
    """The release line of a Go version: "go1.22.10" -> "go1.22"; None if not a release."""
    m = _RELEASE.match(go_version)
    return f"go{m.group(1)}.{m.group(2)}" if m else None


@parse_guard
def runtime_offsets(binary: GoBinary, go_version: str) -> RuntimeOffsets:
    """Offsets from the binary's DWARF, else from the committed table for its release."""
    if binary.has_dwarf and binary.elf.has_dwarf_info():
        offsets = _from_dwarf(binary, go_version)
        if offsets is not None:
            return offsets
        why = "its DWARF has no runtime.g"
    else:
        why = "stripped binary"
    return _from_table(go_version, why)


def table_offsets(go_version: str) -> RuntimeOffsets:
    """Offsets from the committed table alone: milliseconds, where reading DWARF takes
    seconds (`goleash check` analyses every test binary; the tests check the table
    against DWARF for every toolchain)."""
    return _from_table(go_version, "no DWARF lookup wanted")


# --- DWARF --------------------------------------------------------------------------


def _from_dwarf(binary: GoBinary, go_version: str) -> RuntimeOffsets | None:
    names = {"runtime.g", "runtime.m"}
    dwarf = _types_dwarf(binary)
    structs = _structs_by_name(dwarf, names) if dwarf is not None else {}
    if len(structs) < len(names):  # not where the name search looked: walk the units
        structs = _find_structs(binary.elf.get_dwarf_info(), names)
    g, m = structs.get("runtime.g"), structs.get("runtime.m")
    if g is None or m is None:
        return None
    values: dict[str, Any] = {}
    for struct, name, members in ((g, "runtime.g", _G_MEMBERS), (m, "runtime.m", _M_MEMBERS)):
        for key, path in members.items():
            offset = _path_offset(struct, path)
            if offset is None and key not in _OPTIONAL:
                raise OffsetsUnavailableError(
                    f"{binary.path}: {go_version}: {name} has no field {path} in its DWARF; "
                    "this Go runtime's layout is not supported yet"
                )
            values[key] = offset
    values["g_waitreason_size"] = _byte_size(_member_type(g, "waitreason"))
    values["g_atomicstatus_size"] = _byte_size(_member_type(g, "atomicstatus"))
    return RuntimeOffsets(**values, source="dwarf", go_version=go_version)


def _types_dwarf(binary: GoBinary) -> DWARFInfo | None:
    """The DWARF of BINARY with only what type DIEs need (.debug_info, .debug_abbrev,
    .debug_str): pyelftools' get_dwarf_info decompresses every debug section, line
    tables and frames included, which is most of its cost. None for old-style
    .zdebug_* sections (the caller then takes the whole DWARF)."""
    elf = binary.elf
    secs: dict[str, DebugSectionDescriptor | None] = {}
    for name in (".debug_info", ".debug_abbrev", ".debug_str"):
        sec = elf.get_section_by_name(name)
        if sec is None:
            if name == ".debug_str":
                secs[name] = None
                continue
            return None
        data = sec.data()
        secs[name] = DebugSectionDescriptor(
            stream=io.BytesIO(data),
            name=name,
            global_offset=sec["sh_offset"],
            size=len(data),
            address=sec["sh_addr"],
        )
    return DWARFInfo(
        config=DwarfConfig(
            little_endian=elf.little_endian,
            default_address_size=elf.elfclass // 8,
            machine_arch=elf.get_machine_arch(),
        ),
        debug_info_sec=secs[".debug_info"],
        debug_aranges_sec=None,
        debug_abbrev_sec=secs[".debug_abbrev"],
        debug_frame_sec=None,
        eh_frame_sec=None,
        debug_str_sec=secs[".debug_str"],
        debug_loc_sec=None,
        debug_ranges_sec=None,
        debug_line_sec=None,
        debug_pubtypes_sec=None,
        debug_pubnames_sec=None,
        debug_addr_sec=None,
        debug_str_offsets_sec=None,
        debug_line_str_sec=None,
        debug_loclists_sec=None,
        debug_rnglists_sec=None,
        debug_sup_sec=None,
        gnu_debugaltlink_sec=None,
        debug_types_sec=None,
    )


MAX_NAME_HITS = 64  # occurrences of one name tried before walking the units instead


def _structs_by_name(dwarf: DWARFInfo, names: set[str]) -> dict[str, DIE]:
    """Top-level struct DIEs found through their names in the raw .debug_info.

    Go's linker writes a type's name inline (DW_FORM_string) as the first attribute
    of its DIE, right after a one-byte abbreviation code. So each occurrence of
    "runtime.g\0" is a candidate DIE one byte earlier; pyelftools parses it and only a
    structure_type DIE of exactly that name counts (a typedef or "*runtime.g" does
    not). Parsing two DIEs beats walking thousands. Whatever is not found this way
    is left to _find_structs."""
    assert dwarf.debug_info_sec is not None
    stream = dwarf.debug_info_sec.stream
    raw = stream.getvalue() if isinstance(stream, io.BytesIO) else b""
    found: dict[str, DIE] = {}
    for name in names:
        needle = name.encode() + b"\0"
        at, tries = raw.find(needle), 0
        while at > 0 and tries < MAX_NAME_HITS:
            tries += 1
            die = _die_at(dwarf, at - 1)
            if (
                die is not None
                and die.tag == "DW_TAG_structure_type"
                and _die_name(die) == name.encode()
                and die.has_children
            ):
                found[name] = die
                break
            at = raw.find(needle, at + 1)
    return found


def _die_at(dwarf: DWARFInfo, offset: int) -> DIE | None:
    try:
        return dwarf.get_DIE_from_refaddr(offset)
    except Exception:  # not a DIE boundary: garbage to pyelftools, not to us
        return None


def _find_structs(dwarf: DWARFInfo, names: set[str]) -> dict[str, DIE]:
    """Top-level struct DIEs by name, looking only where Go's linker puts types.

    Go's linker emits every type DIE into a "runtime" compile unit, so the other
    packages' units, which hold most of the DIEs, are never parsed. When the runtime
    is split into several units, the one with the types is not always the largest
    (Go 1.22/1.23 builds: two of nearly equal size, the types in the second, and
    walking the first whole cost 0.6 CPU-s): the units are walked side by side, one
    DIE each in turn, largest first. Stops as soon as all names are found.
    """
    wanted = {n.encode() for n in names}
    found: dict[str, DIE] = {}
    units = [cu for cu in dwarf.iter_CUs() if _die_name(cu.get_top_DIE()) == b"runtime"]
    units.sort(key=lambda cu: -cu["unit_length"])
    walks = [cu.get_top_DIE().iter_children() for cu in units]
    while walks:
        for walk in list(walks):
            die = next(walk, None)
            if die is None:
                walks.remove(walk)
            elif die.tag == "DW_TAG_structure_type" and _die_name(die) in wanted:
                found[_die_name(die).decode()] = die  # type: ignore[union-attr]
                if len(found) == len(wanted):
                    return found
    return found


def _die_name(die: DIE) -> bytes | None:
    attr = die.attributes.get("DW_AT_name")
    return None if attr is None else attr.value  # type: ignore[no-any-return]


def _member(struct: DIE, name: str) -> DIE | None:
    want = name.encode()
    for child in struct.iter_children():
        if child.tag == "DW_TAG_member" and _die_name(child) == want:
            return child
    return None


def _strip_typedefs(die: DIE) -> DIE:
    # Go names its struct types through a typedef DIE (runtime.gobuf -> struct).
    while die.tag == "DW_TAG_typedef" and "DW_AT_type" in die.attributes:
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def _member_type(struct: DIE, name: str) -> DIE:
    member = _member(struct, name)
    if member is None:
        raise OffsetsUnavailableError(f"runtime struct has no field {name} in DWARF")
    return _strip_typedefs(member.get_DIE_from_attribute("DW_AT_type"))


def _member_location(member: DIE) -> int:
    value = member.attributes["DW_AT_data_member_location"].value
    if isinstance(value, int):
        return value
    # DWARF 2 style: an expression DW_OP_plus_uconst <uleb128>.
    data = bytes(value)
    if not data or data[0] != 0x23:
        raise OffsetsUnavailableError(f"unexpected DWARF member location {data!r}")
    result, shift = 0, 0
    for byte in data[1:]:
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return result


def _path_offset(struct: DIE, path: str) -> int | None:
    """Offset of a dotted member path; None when a member on the path is missing."""
    offset = 0
    names = path.split(".")
    for i, name in enumerate(names):
        member = _member(struct, name)
        if member is None:
            return None
        offset += _member_location(member)
        if i + 1 < len(names):
            struct = _strip_typedefs(member.get_DIE_from_attribute("DW_AT_type"))
    return offset


def _byte_size(die: DIE) -> int:
    return int(die.attributes["DW_AT_byte_size"].value)


# --- the committed table ----------------------------------------------------------------


@cache
def load_table() -> dict[str, dict[str, Any]]:
    """The committed table: release line ("go1.22") -> row (offsets + generated_from)."""
    table: dict[str, dict[str, Any]] = json.loads(TABLE_PATH.read_text())
    return table


def _from_table(go_version: str, why: str) -> RuntimeOffsets:
    release = go_release(go_version)
    row = load_table().get(release) if release else None
    if row is None:
        line = release or f"Go version {go_version!r}"
        raise OffsetsUnavailableError(
            f"{go_version}: {why} and no offsets table row for {line}; rebuild with DWARF "
            "(no -ldflags=-w) or add the toolchain to scripts/go-toolchains.txt and "
            "regenerate the table (make offsets-table)"
        )
    return RuntimeOffsets(
        **{k: row[k] for k in OFFSET_FIELDS}, source="table", go_version=go_version
    )
