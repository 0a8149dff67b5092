"""Runtime struct offsets: DWARF of real builds, the committed table, and the runtime source.

Every toolchain in scripts/go-toolchains.txt is checked: the table row must equal what
DWARF says for that toolchain's build, and DWARF must agree with the field order and
types written in that toolchain's src/runtime/runtime2.go.
"""

from __future__ import annotations

import re
from functools import cache

import pytest

import gobuild
from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import OffsetsUnavailableError
from goleash.gobin.offsets import (
    OFFSET_FIELDS,
    RuntimeOffsets,
    _find_structs,
    _structs_by_name,
    _types_dwarf,
    go_release,
    load_table,
    runtime_offsets,
)
from goleash.gobin.offsets_table import toolchain_version


@cache
def exact_version(toolchain: str) -> str:
    return toolchain_version(gobuild, toolchain)


@cache
def dwarf_offsets(toolchain: str) -> RuntimeOffsets:
    with GoBinary(gobuild.build("spawner", toolchain, "default")) as binary:
        return runtime_offsets(binary, exact_version(toolchain))


def minor(toolchain: str) -> int:
    return int(toolchain.split(".")[1])


@cache
def struct_fields(toolchain: str, struct: str) -> list[tuple[str, str]]:
    """(name, type) of each field of `type <struct> struct` in the toolchain's source."""
    src = (gobuild.go_root(toolchain) / "src" / "runtime" / "runtime2.go").read_text()
    body = re.search(rf"^type {struct} struct {{\n(.*?)^}}", src, re.M | re.S)
    assert body, f"no struct {struct} in {toolchain}'s runtime2.go"
    out = []
    for line in body.group(1).splitlines():
        code = line.split("//", 1)[0].strip()
        if code:
            parts = code.split(None, 1)  # an embedded field (mOS) is its own type
            out.append((parts[0], parts[-1].strip()))
    return out


def field_names(toolchain: str, struct: str) -> list[str]:
    return [name for name, _ in struct_fields(toolchain, struct)]


def test_dwarf_read(toolchain: str) -> None:
    offs = dwarf_offsets(toolchain)
    assert offs.source == "dwarf"
    assert offs.go_version == exact_version(toolchain)


def test_table_row_equals_dwarf(toolchain: str) -> None:
    version = exact_version(toolchain)
    row = load_table().get(go_release(version) or "")
    assert row is not None, f"no table row for {version}: run `make offsets-table`"
    assert row["generated_from"] == version
    assert {k: row[k] for k in OFFSET_FIELDS} == dwarf_offsets(toolchain).as_row()


@pytest.mark.parametrize("variant", ["pie", "trimpath", "cgo"])
def test_every_variant_with_dwarf_agrees(toolchain: str, variant: str) -> None:
    # These link differently (cgo puts the runtime unit elsewhere in .debug_info);
    # the runtime's layout must read the same from each.
    with GoBinary(gobuild.build("spawner", toolchain, variant)) as binary:
        offs = runtime_offsets(binary, exact_version(toolchain))
    assert offs.source == "dwarf"
    assert offs.as_row() == dwarf_offsets(toolchain).as_row()


@pytest.mark.parametrize("variant", ["default", "cgo"])
def test_name_search_finds_the_structs_the_unit_walk_finds(toolchain: str, variant: str) -> None:
    # The fast path (a DIE found by its inline name) must land on the very DIEs the
    # walk of the runtime units finds, in plain and cgo builds alike.
    names = {"runtime.g", "runtime.m"}
    with GoBinary(gobuild.build("spawner", toolchain, variant)) as binary:
        fast = _structs_by_name(_types_dwarf(binary), names)
        walked = _find_structs(binary.elf.get_dwarf_info(), names)
    assert set(fast) == names
    assert {k: d.offset for k, d in fast.items()} == {k: d.offset for k, d in walked.items()}


def test_name_search_leaves_what_it_cannot_find_to_the_walk(toolchain: str) -> None:
    with GoBinary(gobuild.build("spawner", toolchain, "default")) as binary:
        assert _structs_by_name(_types_dwarf(binary), {"runtime.nosuchtype"}) == {}


def test_stripped_binary_uses_table(toolchain: str) -> None:
    version = exact_version(toolchain)
    with GoBinary(gobuild.build("spawner", toolchain, "stripped")) as binary:
        assert not binary.has_dwarf
        offs = runtime_offsets(binary, version)
    assert offs.source == "table"
    assert offs.go_version == version
    assert offs.as_row() == dwarf_offsets(toolchain).as_row()


def test_parent_goid_since_go121(toolchain: str) -> None:
    offs = dwarf_offsets(toolchain)
    if minor(toolchain) < 21:
        assert offs.g_parent_goid is None
    else:
        assert offs.g_parent_goid is not None
        # parentGoid sits right before gopc in every release that has it.
        assert offs.g_gopc == offs.g_parent_goid + 8


def stripped_binary() -> GoBinary:
    return GoBinary(gobuild.build("spawner", gobuild.TOOLCHAINS[-1], "stripped"))


def test_unknown_release_on_stripped_binary_is_actionable() -> None:
    with stripped_binary() as binary, pytest.raises(OffsetsUnavailableError) as err:
        runtime_offsets(binary, "go1.28.1")
    msg = str(err.value)
    assert msg.startswith("go1.28.1: stripped binary and no offsets table row for go1.28")
    assert "scripts/go-toolchains.txt" in msg
    assert "make offsets-table" in msg


def test_unparseable_version_on_stripped_binary_raises() -> None:
    with stripped_binary() as binary, pytest.raises(OffsetsUnavailableError, match="devel"):
        runtime_offsets(binary, "devel go1.28-abcdef")


def test_release_line() -> None:
    assert go_release("go1.22.10") == "go1.22"
    assert go_release("go1.19") == "go1.19"
    assert go_release("go1.23rc1") == "go1.23"
    assert go_release("go1.22.10 X:boringcrypto") == "go1.22"
    assert go_release("devel +abc") is None


# --- DWARF against the runtime source ----------------------------------------------


def test_gobuf_fields_follow_source(toolchain: str) -> None:
    # Every gobuf field is pointer-sized, so a field's offset is 8 * its position.
    offs = dwarf_offsets(toolchain)
    gobuf = field_names(toolchain, "gobuf")
    sched = offs.g_sched_sp - 8 * gobuf.index("sp")
    assert offs.g_sched_pc == sched + 8 * gobuf.index("pc")
    assert offs.g_sched_bp == sched + 8 * gobuf.index("bp")
    assert offs.g_sched_pc == offs.g_sched_sp + 8


def test_g_fields_in_source_order(toolchain: str) -> None:
    offs = dwarf_offsets(toolchain)
    ours = {
        "stack": offs.g_stack_lo,
        "m": offs.g_m,
        "sched": offs.g_sched_sp,
        "syscallsp": offs.g_syscallsp,
        "syscallpc": offs.g_syscallpc,
        "atomicstatus": offs.g_atomicstatus,
        "goid": offs.g_goid,
        "waitsince": offs.g_waitsince,
        "waitreason": offs.g_waitreason,
        "parentGoid": offs.g_parent_goid,
        "gopc": offs.g_gopc,
        "startpc": offs.g_startpc,
    }
    in_source = [n for n in field_names(toolchain, "g") if ours.get(n) is not None]
    by_offset = sorted(in_source, key=lambda n: ours[n])
    assert by_offset == in_source
    assert offs.g_stack_lo == 0 and offs.g_stack_hi == 8  # stack{lo, hi} is g's first field


def test_goid_follows_atomicstatus_as_in_source(toolchain: str) -> None:
    # Source: atomicstatus (4 bytes), stackLock uint32, goid (8-aligned).
    names = field_names(toolchain, "g")
    i = names.index("atomicstatus")
    assert names[i + 1 : i + 3] == ["stackLock", "goid"]
    offs = dwarf_offsets(toolchain)
    assert offs.g_goid == offs.g_atomicstatus + 8
    assert offs.g_syscallpc == offs.g_syscallsp + 8


def test_sizes_match_source_types(toolchain: str) -> None:
    sizes = {"uint8": 1, "uint16": 2, "uint32": 4, "atomic.Uint32": 4}
    src = (gobuild.go_root(toolchain) / "src" / "runtime" / "runtime2.go").read_text()
    waitreason_type = re.search(r"^type waitReason (\w+)", src, re.M)
    assert waitreason_type
    types = dict(struct_fields(toolchain, "g"))
    offs = dwarf_offsets(toolchain)
    assert offs.g_waitreason_size == sizes[waitreason_type.group(1)]
    assert offs.g_atomicstatus_size == sizes[types["atomicstatus"]]
    # Go 1.20 made atomicstatus an atomic.Uint32 struct; the offset is still the field's.
    assert types["atomicstatus"] == ("uint32" if minor(toolchain) < 20 else "atomic.Uint32")


def test_m_fields_in_source_order(toolchain: str) -> None:
    offs = dwarf_offsets(toolchain)
    names = field_names(toolchain, "m")
    assert names[0] == "g0" and offs.m_g0 == 0
    assert offs.m_curg > offs.m_g0


def test_table_covers_every_toolchain_and_nothing_else() -> None:
    releases = {go_release(exact_version(t)) for t in gobuild.TOOLCHAINS}
    assert set(load_table()) == releases
