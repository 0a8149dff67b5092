"""Build info, pclntab and symbols read from real Go binaries of every toolchain/variant."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import capstone
import pytest

import gobuild
from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import (
    BuildInfo,
    check_supported,
    parse_go_version,
    read_build_info,
)
from goleash.gobin.errors import (
    NotELFError,
    NotGoError,
    SymbolNotFoundError,
    UnsupportedGoVersionError,
)
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.symbols import symbol_table

FIXTURE = "spawner"
NON_GO_ELF = Path("/bin/true")


@functools.cache
def binary(toolchain: str, variant: str) -> GoBinary:
    # One GoBinary per build for the whole session, so Pclntab.from_binary parses once.
    return GoBinary(gobuild.build(FIXTURE, toolchain, variant))


@functools.cache
def toolchain_version(toolchain: str) -> str:
    go = gobuild.go_root(toolchain) / "bin" / "go"
    out = subprocess.run(
        [str(go), "version"], env=gobuild.go_env(toolchain), capture_output=True, text=True
    ).stdout
    m = re.match(r"go version (\S+) ", out)
    assert m, out
    return m.group(1)


def newproc_return_addresses(b: GoBinary, tab: Pclntab, caller: str) -> list[int]:
    """Return addresses of every CALL to runtime.newproc inside `caller`."""
    f = tab.func_by_name(caller)
    assert f is not None
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    out = []
    for insn in md.disasm(b.read(f.entry, f.end - f.entry), f.entry):
        if insn.mnemonic == "call" and insn.op_str.startswith("0x"):
            target = tab.func_for_pc(int(insn.op_str, 16))
            if target is not None and target.name == "runtime.newproc":
                out.append(insn.address + insn.size)
    return out


# --- build info -----------------------------------------------------------------------


def test_build_info(toolchain: str, variant: str) -> None:
    info = read_build_info(binary(toolchain, variant))
    assert info.go_version == toolchain_version(toolchain)
    assert info.version == parse_go_version(toolchain_version(toolchain))
    assert info.main_module == "example.com/spawner"
    assert info.settings["GOARCH"] == "amd64"
    assert info.settings["GOOS"] == "linux"
    assert info.buildmode == ("pie" if variant == "pie" else "exe")
    if info.version >= (1, 20, 0):  # Go 1.19 does not record -buildmode
        assert info.settings["-buildmode"] == info.buildmode
    assert info.cgo == (variant == "cgo")
    assert info.settings["CGO_ENABLED"] == ("1" if variant == "cgo" else "0")
    assert info.trimpath == (variant == "trimpath")
    assert (info.settings.get("-ldflags") == "-s -w") == (variant == "stripped")
    check_supported(info)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("go1.22", (1, 22, 0)),
        ("go1.22.10", (1, 22, 10)),
        ("go1.21rc2", (1, 21, 0)),
        ("go1.23beta1", (1, 23, 0)),
        ("go1.22.10 X:boringcrypto", (1, 22, 10)),
        ("devel go1.24-abc123 Tue Jan 7 10:00:00 2025 +0000", (1, 24, 0)),
    ],
)
def test_parse_go_version(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_go_version(text) == expected


def test_unparsable_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedGoVersionError, match="cannot understand Go version"):
        parse_go_version("devel +b7a2d413a3 Mon Jan 1")


def test_go_before_register_abi_is_rejected() -> None:
    # No Go 1.16 toolchain here: the record is what read_build_info returns for one.
    old = BuildInfo("go1.16.15", (1, 16, 15), "example.com/x", {})
    with pytest.raises(UnsupportedGoVersionError) as err:
        check_supported(old)
    assert "stack ABI" in str(err.value)
    assert "oldest supported is Go 1.17" in str(err.value)
    check_supported(BuildInfo("go1.17", (1, 17, 0), None, {}))


def test_go117_pointer_format(tmp_path: Path) -> None:
    """Go <= 1.17 points at Go strings instead of inlining them (no such toolchain here).

    A real binary is rewritten into that layout: the header gets flags=0 and two
    pointers to string headers, which point at the strings where they already are.
    """
    src = gobuild.build(FIXTURE, "1.22.10")
    with GoBinary(src) as b:
        sec = b.section(".go.buildinfo")
        assert sec is not None
        blob = b.read(sec.vaddr, sec.size)
        ro = b.section(".rodata")
        assert ro is not None
        ro_off = ro.offset
    vers_len = blob[32]
    vers_addr = sec.vaddr + 33
    mod_len, n = 0, 0
    for n, byte in enumerate(blob[33 + vers_len :], 1):
        mod_len |= (byte & 0x7F) << (7 * (n - 1))
        if byte < 0x80:
            break
    mod_addr = vers_addr + vers_len + n
    data = bytearray(src.read_bytes())
    # Two Go string headers (ptr, len) in a spare spot: the first bytes of .rodata.
    hdrs = b"".join(x.to_bytes(8, "little") for x in (vers_addr, 9, mod_addr, mod_len))
    data[ro_off : ro_off + 32] = hdrs
    off = sec.offset
    data[off + 15] = 0  # flags: pointer format, little endian
    data[off + 16 : off + 32] = ro.vaddr.to_bytes(8, "little") + (ro.vaddr + 16).to_bytes(
        8, "little"
    )
    assert data[off + 33 : off + 42] == b"go1.22.10"
    data[off + 33 : off + 42] = b"go1.17.13"
    patched = tmp_path / "go117"
    patched.write_bytes(bytes(data))
    with GoBinary(patched) as b:
        info = read_build_info(b)
    assert info.go_version == "go1.17.13"
    assert info.version == (1, 17, 13)
    assert info.main_module == "example.com/spawner"
    assert info.settings["GOARCH"] == "amd64"
    check_supported(info)


# --- pclntab ----------------------------------------------------------------------------


def test_pclntab_finds_functions(toolchain: str, variant: str) -> None:
    tab = Pclntab.from_binary(binary(toolchain, variant))
    assert Pclntab.from_binary(binary(toolchain, variant)) is tab
    for name in ("main.worker", "main.spawn", "runtime.newproc1", "runtime.goexit1"):
        f = tab.func_by_name(name)
        assert f is not None, name
        assert not f.wrapper
        assert f.entry < f.end
        assert tab.func_for_pc(f.entry) == f
        assert tab.func_for_pc(f.end - 1) == f
    entries = [f.entry for f in tab.functions]
    assert entries == sorted(entries)
    assert tab.func_for_pc(tab.functions[0].entry - 1) is None
    assert tab.func_for_pc(tab.functions[-1].end) is None
    mains = tab.funcs_matching("main.*")
    assert {"main.main", "main.spawn", "main.worker"} <= {f.name for f in mains}
    assert all(f.name.startswith("main.") for f in mains)


def test_name_index_agrees_with_each_function_read_alone(toolchain: str, variant: str) -> None:
    # The name index and the wrapper set read every name in one pass over the name
    # table; each function's own name read (what Func names come from) must agree.
    tab = Pclntab.from_binary(binary(toolchain, variant))
    names = [tab._func_name(i) for i in range(len(tab._funcoffs))]
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if i not in tab._wrappers:
            first.setdefault(name, i)
    assert tab._by_name == first
    assert len(first) > 1000
    # A wrapper shares its name with the function it wraps, and is never the one found.
    for i in tab._wrappers:
        assert first[names[i]] != i
        assert tab.func_by_name(names[i]) == tab._func_at(first[names[i]])


def test_pclntab_agrees_with_symtab(toolchain: str, variant: str) -> None:
    b = binary(toolchain, variant)
    tab = Pclntab.from_binary(b)
    if not b.has_symtab:
        # -s -w drops .symtab and DWARF but moves no code: compare with the .symtab
        # of the same program built without it.
        b = binary(toolchain, "default")
        assert tab.functions == Pclntab.from_binary(b).functions
    addrs: dict[str, set[int]] = {}
    for sym in b.elf.get_section_by_name(".symtab").iter_symbols():  # type: ignore[union-attr]
        if sym["st_info"]["type"] == "STT_FUNC":
            addrs.setdefault(sym.name, set()).add(sym["st_value"])
            # Go 1.18-1.20 pclntab names show the outermost [...] span as "[...]".
            i, j = sym.name.find("["), sym.name.rfind("]")
            if 0 <= i < j:
                short = sym.name[:i] + "[...]" + sym.name[j + 1 :]
                addrs.setdefault(short, set()).add(sym["st_value"])
    checked = 0
    for f in tab.functions:
        # .symtab names the ABI0 half of a wrapper pair and assembly "name.abi0", and
        # writes the "·" of linker-made names (type:.eq.T·4) as ".".
        name = f.name.replace("·", ".")
        candidates = addrs.get(name, set()) | addrs.get(name + ".abi0", set())
        assert f.entry in candidates, f
        checked += 1
    assert checked > 1000
    wrappers = [f for f in tab.functions if f.wrapper]
    assert wrappers, "Go 1.17+ always has ABI wrappers (e.g. runtime.goexit1 for asm)"
    for w in wrappers:
        body = tab.func_by_name(w.name)
        assert body is not None and body.entry != w.entry


def test_go_statement_line(toolchain: str, variant: str) -> None:
    """gopc (return address of the go statement's CALL runtime.newproc) -> file:line."""
    b = binary(toolchain, variant)
    tab = Pclntab.from_binary(b)
    file_name, line = gobuild.marker_line(FIXTURE, "spawn-worker")
    (gopc,) = newproc_return_addresses(b, tab, "main.spawn")
    site = tab.call_site(gopc)
    assert site is not None
    assert site.function == "main.spawn"
    assert site.line == line
    if variant == "trimpath":
        assert site.file == f"example.com/spawner/{file_name}"
    else:
        assert site.file.startswith("/")
        assert site.file.endswith(f"/spawner/{file_name}")
    assert tab.source_line(gopc - 1) == site


def test_source_line_of_function_entry(toolchain: str) -> None:
    b = binary(toolchain, "default")
    tab = Pclntab.from_binary(b)
    worker = tab.func_by_name("main.worker")
    assert worker is not None
    src = tab.source_line(worker.entry)
    assert src is not None
    assert src.function == "main.worker"
    text = (gobuild.FIXTURES / FIXTURE / "main.go").read_text().splitlines()
    assert text[src.line - 1].startswith("func worker(")
    assert tab.source_line(tab.functions[-1].end) is None


def test_no_section_headers(toolchain: str, variant: str, tmp_path: Path) -> None:
    """Without section headers everything is found from segments and moduledata."""
    b = binary(toolchain, variant)
    data = bytearray(b.path.read_bytes())
    data[0x28:0x30] = bytes(8)  # e_shoff
    data[0x3C:0x40] = bytes(4)  # e_shnum, e_shstrndx
    bare_path = tmp_path / "bare"
    bare_path.write_bytes(bytes(data))
    with GoBinary(bare_path) as bare:
        assert not bare.sections
        assert read_build_info(bare) == read_build_info(b)
        tab, ref = Pclntab.from_binary(bare), Pclntab.from_binary(b)
        assert tab.functions == ref.functions
        assert tab.text_start == ref.text_start
        (gopc,) = newproc_return_addresses(bare, tab, "main.spawn")
        assert tab.call_site(gopc) == ref.call_site(gopc)
        table = symbol_table(bare)
        assert table.source == "pclntab"
        worker = ref.func_by_name("main.worker")
        assert worker is not None
        assert table.lookup("main.worker") == (worker.entry, worker.end - worker.entry)


def test_function_list_of_a_stripped_binary() -> None:
    """Every function, from pclntab alone (how long that takes: `make bench`, gobin)."""
    path = gobuild.build(FIXTURE, gobuild.TOOLCHAINS[-1], "stripped")
    with GoBinary(path) as b:
        names = {f.name for f in Pclntab.from_binary(b).functions}
    assert len(names) > 1000
    assert {"main.main", "runtime.goexit1", "runtime.newproc1"} <= names


# --- symbols ------------------------------------------------------------------------------


def test_symbol_table(toolchain: str, variant: str) -> None:
    b = binary(toolchain, variant)
    table = symbol_table(b)
    tab = Pclntab.from_binary(b)
    for name in ("main.worker", "runtime.newproc1", "runtime.goexit1"):
        f = tab.func_by_name(name)
        assert f is not None
        addr, size = table.require(name)
        assert addr == f.entry
        assert 0 < size <= f.end - f.entry
    assert table.lookup("main.no_such_function") is None
    if variant == "stripped":
        assert table.source == "pclntab"
        with pytest.raises(SymbolNotFoundError) as err:
            table.require("runtime.allgs")
        msg = str(err.value)
        assert str(b.path) in msg and "runtime.allgs" in msg and "stripped" in msg
    else:
        assert table.source == "symtab"
        addr, size = table.require("runtime.allgs")
        assert size == 24  # a slice header
        with pytest.raises(SymbolNotFoundError, match=r"main\.no_such_function"):
            table.require("main.no_such_function")
    # Assembly functions are "name.abi0" in .symtab; both sources answer "name".
    assert table.lookup("runtime.goexit") is not None


# --- not Go -------------------------------------------------------------------------------


def test_not_elf(tmp_path: Path) -> None:
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\n" + "echo hello\n" * 20)
    with pytest.raises(NotELFError, match="not an ELF file"):
        GoBinary(text)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x7fELF\x02\x01garbage")
    with pytest.raises(NotELFError):
        GoBinary(tiny)


def test_non_go_elf(tmp_path: Path) -> None:
    path = tmp_path / "true"
    shutil.copy(NON_GO_ELF, path)
    with GoBinary(path) as b:
        with pytest.raises(NotGoError, match="ELF file but not a Go binary"):
            read_build_info(b)
        with pytest.raises(NotGoError, match="not a Go binary"):
            Pclntab.from_binary(b)
        with pytest.raises(NotGoError):
            symbol_table(b).lookup("main.main")
