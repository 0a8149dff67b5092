"""Probe sites chosen by disassembly, on real spawner builds of every toolchain and variant.

A site is right when the bytes at its file offset (what the kernel patches) are the
instruction we meant, it sits where it fires once per call, and the kernel emulates it
where goleash relies on that.
"""

from __future__ import annotations

from functools import cache

import pytest

import gobuild
from goleash.gobin.binary import GoBinary
from goleash.gobin.disasm import (
    GoroutineProbeSites,
    ProbeSite,
    SymbolLookup,
    call_sites,
    disassemble,
    emulated_entry_site,
    entry_site,
    function_probes,
    goroutine_probe_sites,
    kernel_emulates,
    return_sites,
    tail_call_sites,
)
from goleash.gobin.errors import SymbolNotFoundError
from goleash.gobin.pclntab import Pclntab

# what each runtime entry site must still carry in registers (see GoroutineProbeSites)
ENTRY_KEEPS = {
    "runtime.goexit1": {"r14"},
    "runtime.newproc": {"r14"},
    "runtime.gopark": {"r14", "rax", "rbx", "rcx"},
    "runtime.gopanic": {"r14", "rax", "rbx"},
}


def go_at_least(toolchain: str, major: int, minor: int) -> bool:
    return tuple(int(p) for p in toolchain.split(".")[:2]) >= (major, minor)


@cache
def open_binary(toolchain: str, variant: str, fixture: str = "spawner") -> GoBinary:
    return GoBinary(gobuild.build(fixture, toolchain, variant))


def _pclntab(binary: GoBinary) -> Pclntab:
    return Pclntab.from_binary(binary)


def lookup_for(binary: GoBinary) -> SymbolLookup:
    """.symtab when present, else pclntab (whose sizes run to the next function)."""
    if binary.has_symtab:
        return binary.elf_symbols.get
    tab = _pclntab(binary)

    def lookup(name: str) -> tuple[int, int] | None:
        f = tab.func_by_name(name)
        return None if f is None else (f.entry, f.end - f.entry)

    return lookup


def every_body(binary: GoBinary, name: str) -> list[tuple[int, int]]:
    """A function and its linker-made ABI wrapper, if any (".abi0" in .symtab)."""
    if binary.has_symtab:
        found = (binary.elf_symbols.get(n) for n in (name, f"{name}.abi0"))
        return [f for f in found if f is not None]
    return [(f.entry, f.end - f.entry) for f in _pclntab(binary).functions if f.name == name]


@cache
def sites(toolchain: str, variant: str) -> GoroutineProbeSites:
    b = open_binary(toolchain, variant)
    return goroutine_probe_sites(b, lookup_for(b))


def need(lookup: SymbolLookup, name: str) -> tuple[int, int]:
    found = lookup(name)
    assert found is not None, f"{name} missing"
    return found


def assert_patchable(b: GoBinary, site: ProbeSite, mnemonic: str) -> None:
    """The file bytes at site.file_offset decode to the instruction the site names."""
    assert site.file_offset == b.vaddr_to_offset(site.vaddr)
    (ins, *_) = disassemble(b, site.vaddr, 16)
    assert ins.mnemonic == mnemonic, site
    assert bytes(b.data[site.file_offset : site.file_offset + ins.size]) == ins.raw
    assert site.instruction == ins.text
    assert site.emulated == ins.is_emulated


def stack_check_end(b: GoBinary, addr: int, size: int) -> int:
    """Address after the `jbe` whose target calls runtime.morestack*: found independently
    of disasm's prologue matcher, by following the branch to the morestack call."""
    morestack = {
        a for n in ("runtime.morestack", "runtime.morestack_noctxt") for a, _ in every_body(b, n)
    }
    insns = disassemble(b, addr, size)
    by_addr = {i.address: k for k, i in enumerate(insns)}
    for ins in insns[:6]:
        if ins.mnemonic == "jbe" and ins.target in by_addr:
            # the tail spills argument registers, then calls morestack
            call = next(t for t in insns[by_addr[ins.target] :] if t.is_call)
            if call.target in morestack:
                return ins.end
    raise AssertionError("no stack-growth check found")


# --- goroutine sites --------------------------------------------------------------------


def test_create_site_is_the_runqput_call_in_newproc_closure(toolchain: str, variant: str) -> None:
    b = open_binary(toolchain, variant)
    lookup = lookup_for(b)
    s = sites(toolchain, variant)
    closure = need(lookup, "runtime.newproc.func1")
    runqput = need(lookup, "runtime.runqput")

    assert s.create_kind == "runqput_call" and s.create is not None
    assert s.create_sites == [s.create] and s.new_g_register == "rbx"
    assert s.create.symbol == "runtime.newproc.func1"
    assert closure[0] <= s.create.vaddr < closure[0] + closure[1]
    assert_patchable(b, s.create, "call")
    assert disassemble(b, s.create.vaddr, 16)[0].target == runqput[0]
    assert s.create.emulated


@pytest.mark.parametrize("name", sorted(ENTRY_KEEPS))
def test_runtime_entry_sites_are_emulated_and_after_the_stack_check(
    toolchain: str, variant: str, name: str
) -> None:
    b = open_binary(toolchain, variant)
    lookup = lookup_for(b)
    s = sites(toolchain, variant)
    site = {
        "runtime.goexit1": s.exit,
        "runtime.newproc": s.newproc_entry,
        "runtime.gopark": s.gopark,
        "runtime.gopanic": s.gopanic,
    }[name]
    addr, size = need(lookup, name)
    body = stack_check_end(b, addr, size)

    assert site.symbol == name and site.emulated
    assert body <= site.vaddr < addr + size
    if go_at_least(toolchain, 1, 21):
        assert site.vaddr == body
        assert_patchable(b, site, "push")
        assert site.instruction == "push rbp"
    else:
        # Go 1.19 opens frames with `sub rsp` (single-stepped): the site is the first
        # emulated instruction of the straight line after the check, reached once per
        # call with the registers the probe reads still untouched.
        assert disassemble(b, body, 16)[0].mnemonic == "sub"
        before = disassemble(b, body, site.vaddr - body)
        assert not any(i.ends_block or i.is_call or i.is_emulated for i in before)
        assert not any(i.writes & ENTRY_KEEPS[name] for i in before)
        assert_patchable(b, site, disassemble(b, site.vaddr, 16)[0].mnemonic)


def test_create_falls_back_to_newproc1_rets_without_runqput(toolchain: str, variant: str) -> None:
    b = open_binary(toolchain, variant)
    lookup = lookup_for(b)

    def hide_runqput(name: str) -> tuple[int, int] | None:
        return None if name == "runtime.runqput" else lookup(name)

    s = goroutine_probe_sites(b, hide_runqput)
    addr, size = need(lookup, "runtime.newproc1")
    assert s.create_kind == "newproc1_ret" and s.create is None
    assert s.new_g_register == "rax"
    assert s.create_sites == s.create_rets and s.create_rets
    for site in s.create_rets:
        assert site.symbol == "runtime.newproc1"
        assert addr <= site.vaddr < addr + size
        assert_patchable(b, site, "ret")


def test_missing_runtime_function_is_a_named_error() -> None:
    b = open_binary(gobuild.TOOLCHAINS[-1], "default")

    def no_goexit1(name: str) -> tuple[int, int] | None:
        return None if name == "runtime.goexit1" else b.elf_symbols.get(name)

    with pytest.raises(SymbolNotFoundError, match="runtime.goexit1"):
        goroutine_probe_sites(b, no_goexit1)


# --- per-function sites -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["main.worker", "main.spawn", "runtime.newproc1", "runtime.gopark", "runtime.goexit1"]
)
def test_every_ret_site_is_a_ret_inside_the_function(
    toolchain: str, variant: str, name: str
) -> None:
    b = open_binary(toolchain, variant)
    addr, size = need(lookup_for(b), name)
    rets = return_sites(b, name, addr, size)
    assert rets, f"{name} has no RET"
    assert len({r.vaddr for r in rets}) == len(rets)
    for r in rets:
        assert r.symbol == name and addr <= r.vaddr < addr + size
        assert_patchable(b, r, "ret")
        assert not r.emulated  # the kernel single-steps RET: each one costs a trap
    # and none is missed: no other byte run in the function decodes to ret
    assert [i.address for i in disassemble(b, addr, size) if i.is_ret] == [r.vaddr for r in rets]


def test_function_probes_for_a_user_function(toolchain: str, variant: str) -> None:
    b = open_binary(toolchain, variant)
    addr, size = need(lookup_for(b), "main.worker")
    fp = function_probes(b, "main.worker", addr, size)
    assert fp.entry == addr and fp.entry_file_offset == b.vaddr_to_offset(addr)
    assert fp.stack_check
    assert fp.after_check == entry_site(b, "main.worker", addr, size)
    assert fp.after_check.vaddr == stack_check_end(b, addr, size)
    assert fp.entry_probe == emulated_entry_site(b, "main.worker", addr, size, keep=("r14",))
    assert fp.entry_probe.emulated
    if go_at_least(toolchain, 1, 21):
        assert fp.entry_probe == fp.after_check
    assert fp.rets == return_sites(b, "main.worker", addr, size)
    assert fp.tail_calls == []  # Go-compiled functions never tail-call


def test_abi0_wrapper_exits_by_tail_call(toolchain: str, variant: str) -> None:
    # goexit (assembly) reaches goexit1 through its ABI0 wrapper, a bare `jmp`: an exit
    # no RET probe would see, and it lands on goexit1's start, before its stack check.
    b = open_binary(toolchain, variant)
    lookup = lookup_for(b)
    goexit1 = need(lookup, "runtime.goexit1")
    (wrapper,) = [f for f in every_body(b, "runtime.goexit1") if f != goexit1]
    (tail,) = tail_call_sites(b, "runtime.goexit1.abi0", *wrapper)
    assert_patchable(b, tail, "jmp")
    assert disassemble(b, tail.vaddr, 16)[0].target == goexit1[0]
    assert return_sites(b, "runtime.goexit1.abi0", *wrapper) == []


def test_call_sites_find_every_direct_call(toolchain: str, variant: str) -> None:
    b = open_binary(toolchain, variant)
    lookup = lookup_for(b)
    newproc1 = need(lookup, "runtime.newproc1")
    closure = need(lookup, "runtime.newproc.func1")
    (site,) = call_sites(b, "runtime.newproc.func1", *closure, target=newproc1[0])
    assert_patchable(b, site, "call")
    assert call_sites(b, "runtime.newproc.func1", *closure, target=closure[0]) == []


@pytest.mark.parametrize("name", ["main.hugeFrame", "main.largeFrame", "main.smallFrame"])
def test_every_stack_check_form_is_passed(toolchain: str, name: str) -> None:
    # frames of > 4 KiB (`mov r12, rsp; sub r12, N; jb; cmp r12, ...`), > 128 bytes
    # (`lea r12, [rsp-N]; cmp r12, ...`) and small ones (`cmp rsp, ...`)
    b = open_binary(toolchain, "default", "prologues")
    addr, size = need(b.elf_symbols.get, name)
    fp = function_probes(b, name, addr, size)
    assert fp.stack_check
    assert fp.after_check.vaddr == stack_check_end(b, addr, size)
    assert fp.entry_probe.emulated
    if go_at_least(toolchain, 1, 21):
        assert fp.after_check.instruction == "push rbp"


def test_nosplit_function_entry_is_its_first_instruction(toolchain: str) -> None:
    b = open_binary(toolchain, "default", "prologues")
    addr, size = need(b.elf_symbols.get, "main.nosplitLeaf")
    fp = function_probes(b, "main.nosplitLeaf", addr, size)
    assert not fp.stack_check
    assert fp.after_check.vaddr == addr == fp.entry
    assert fp.rets


# --- decoding ---------------------------------------------------------------------------


def test_disassembly_covers_padding_and_undecodable_bytes() -> None:
    b = open_binary(gobuild.TOOLCHAINS[-1], "default")
    addr, size = need(b.elf_symbols.get, "runtime.newproc.func1")
    # the symbol's size stops before the int3 padding up to the next 32-byte boundary
    padded = -(-(addr + size) // 32) * 32 - addr
    insns = disassemble(b, addr, padded)
    assert insns[-1].mnemonic == "int3"
    # "/" (0x2f, the old `das`) is not an x86-64 instruction
    rodata = b.section(".rodata")
    assert rodata is not None
    slash = rodata.vaddr + b.read(rodata.vaddr, rodata.size).index(b"runtime/") + 7
    for region in ((addr, padded), (slash, 64)):
        insns = disassemble(b, *region)
        assert insns[0].address == region[0]
        assert all(x.end == y.address for x, y in zip(insns, insns[1:], strict=False))
        assert insns[-1].end == region[0] + region[1]
    assert disassemble(b, slash, 64)[0].mnemonic == "(bad)"


@pytest.mark.parametrize(
    "raw, emulated",
    [
        (b"\x55", True),  # push rbp
        (b"\x41\x56", True),  # push r14
        (b"\x48\x55", False),  # REX.W push: only REX.B is emulated
        (b"\xe8\x00\x00\x00\x00", True),  # call rel32
        (b"\x66\xe8\x00\x00", False),  # 16-bit call is refused
        (b"\xe9\x00\x00\x00\x00", True),  # jmp rel32
        (b"\x0f\x86\x00\x00\x00\x00", True),  # jbe rel32
        (b"\x76\x00", True),  # jbe rel8
        (b"\x0f\x1f\x44\x00\x00", True),  # Go's 5-byte nop
        (b"\x66\x90", True),  # xchg ax, ax: 2-byte nop
        (b"\xc3", False),  # ret
        (b"\x48\x89\xe5", False),  # mov rbp, rsp
        (b"\x49\x3b\x66\x10", False),  # cmp rsp, [r14+0x10]
        (b"\xff\xd0", False),  # call rax
        (b"\xf0\x0f\xb1\x11", False),  # lock cmpxchg: not even probeable
    ],
)
def test_kernel_emulation_table(raw: bytes, emulated: bool) -> None:
    assert kernel_emulates(raw) is emulated


def test_emulated_flag_agrees_with_mnemonics_across_the_runtime(toolchain: str) -> None:
    b = open_binary(toolchain, "default")
    for name in ("runtime.newproc.func1", "runtime.goexit1", "runtime.gopark"):
        for i in disassemble(b, *need(b.elf_symbols.get, name)):
            expect = (
                i.mnemonic == "push"
                or (i.mnemonic == "nop" and i.size <= 8)  # the kernel knows nops of 1..8 bytes
                or i.text == "xchg ax, ax"  # 66 90, the 2-byte nop
                or (i.target is not None and (i.is_call or i.is_jmp or i.is_cond_jump))
            )
            assert i.is_emulated == expect, i
