"""Where to put uprobes in a Go function, found by disassembling it (capstone, x86-64).

A uprobe hit costs what the kernel does with the probed instruction: `push`, direct
`call`/`jmp`, conditional jumps and the standard NOPs are emulated (~0.55 µs here);
everything else (`mov`, `sub`, `cmp`, `ret`, ...) is single-stepped out of line,
a debug trap and a VM exit (~14-20 µs here). And a probe on a function's first
instruction fires twice whenever the stack grows, because the function runs its
stack-growth check, calls morestack and starts over. So goleash probes:

- entries after the stack-growth check, on an emulated instruction: `push rbp` on
  Go >= 1.21; Go 1.19 opens frames with `sub rsp` (single-stepped), so the first
  emulated instruction of the entry block is used while the registers the probe
  reads are still intact (`emulated_entry_site`);
- returns on every RET (uretprobes corrupt Go's movable stacks);
- goroutine creation on the `call runtime.runqput` in `runtime.newproc.func1`, where
  RBX holds the new g (ABIInternal arguments: RAX, RBX, RCX, ...).

Which instructions are emulated follows `branch_setup_xol_ops`/`push_setup_xol_ops`
in the kernel's arch/x86/kernel/uprobes.c; push emulation is recent, older kernels
single-step `push rbp` (the site stays correct, only dearer).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, Literal

from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import ProbeSiteError, SymbolNotFoundError, parse_guard

SymbolLookup = Callable[[str], "tuple[int, int] | None"]
"""name -> (address, size), e.g. `binary.elf_symbols.get` or a pclntab lookup."""


@cache
def _capstone() -> tuple[Any, int, int, int]:
    """capstone's x86-64 decoder, made at the first disassembly: importing capstone
    loads every architecture it knows (~0.1 s), which `goleash check` pays only when
    no earlier run analysed its test binaries (node/checksites.py)."""
    from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_MODE_64, Cs
    from capstone.x86 import X86_OP_IMM

    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    cs.detail = True
    return cs, CS_GRP_JUMP, CS_GRP_CALL, X86_OP_IMM


# x86_nops[len] of arch/x86/include/asm/nops.h (x86-64, ASM_NOP_MAX = 8); the same
# byte sequences Go's assembler pads with.
_KERNEL_NOPS = (
    b"\x90",
    b"\x66\x90",
    b"\x0f\x1f\x00",
    b"\x0f\x1f\x40\x00",
    b"\x0f\x1f\x44\x00\x00",
    b"\x66\x0f\x1f\x44\x00\x00",
    b"\x0f\x1f\x80\x00\x00\x00\x00",
    b"\x0f\x1f\x84\x00\x00\x00\x00\x00",
)
_LEGACY_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3")
# uprobe_init_insn refuses instructions with these prefixes outright.
_REFUSED_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\xf0")


def kernel_emulates(raw: bytes) -> bool:
    """Whether the x86-64 uprobe code emulates this instruction instead of single-stepping."""
    if 0 < len(raw) <= len(_KERNEL_NOPS) and raw == _KERNEL_NOPS[len(raw) - 1]:
        return True
    i = 0
    while i < len(raw) and raw[i] in _LEGACY_PREFIXES:
        i += 1
    prefixes = raw[:i]
    if any(p in _REFUSED_PREFIXES for p in prefixes):
        return False
    rex = raw[i] if i < len(raw) and 0x40 <= raw[i] <= 0x4F else None
    if rex is not None:
        i += 1
    if i >= len(raw):
        return False
    op = raw[i]
    if op == 0x90:  # "prefix* + nop"
        return True
    branch = (
        op in (0xE8, 0xE9, 0xEB)
        or 0x70 <= op <= 0x7F
        or (op == 0x0F and i + 1 < len(raw) and 0x80 <= raw[i + 1] <= 0x8F)
    )
    if branch:
        return 0x66 not in prefixes  # 16-bit branches are refused
    if 0x50 <= op <= 0x57:  # push reg; only REX.B (0x41) for r8..r15
        return len(raw) == 1 or (len(raw) == 2 and rex == 0x41)
    return False


def _gpr_aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    legacy = {
        "rax": ("eax", "ax", "al", "ah"),
        "rbx": ("ebx", "bx", "bl", "bh"),
        "rcx": ("ecx", "cx", "cl", "ch"),
        "rdx": ("edx", "dx", "dl", "dh"),
        "rsi": ("esi", "si", "sil"),
        "rdi": ("edi", "di", "dil"),
        "rbp": ("ebp", "bp", "bpl"),
        "rsp": ("esp", "sp", "spl"),
    }
    for full, subs in legacy.items():
        out[full] = full
        for s in subs:
            out[s] = full
    for n in range(8, 16):
        for suffix in ("", "d", "w", "b"):
            out[f"r{n}{suffix}"] = f"r{n}"
    return out


_GPR = _gpr_aliases()


@dataclass(frozen=True)
class Instruction:
    address: int
    size: int
    mnemonic: str  # "(bad)" for bytes capstone cannot decode
    op_str: str
    raw: bytes
    target: int | None = None  # destination of a direct call/jmp/jcc
    writes: frozenset[str] = frozenset()  # registers written, as 64-bit names ("rax")

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    @property
    def is_emulated(self) -> bool:
        return self.mnemonic != "(bad)" and kernel_emulates(self.raw)

    @property
    def is_ret(self) -> bool:
        return self.mnemonic == "ret"

    @property
    def is_call(self) -> bool:
        return self.mnemonic == "call"

    @property
    def is_jmp(self) -> bool:
        return self.mnemonic == "jmp"

    @property
    def is_cond_jump(self) -> bool:
        return self.mnemonic.startswith("j") and not self.is_jmp

    @property
    def ends_block(self) -> bool:
        """Control leaves the straight line here, or the bytes are not code. An indirect
        call ends it too: it is not emulated, and the callee clobbers every register but
        R14/R15, so no site after it can carry arguments."""
        return (
            self.is_ret
            or self.is_jmp
            or self.is_cond_jump
            or self.mnemonic in ("int3", "ud2", "(bad)")
            or (self.is_call and self.target is None)
        )


def _decode(raw: bytes, address: int) -> list[Instruction]:
    cs, grp_jump, grp_call, op_imm = _capstone()
    out: list[Instruction] = []
    for ins in cs.disasm(raw, address):
        target = None
        if (
            (ins.group(grp_jump) or ins.group(grp_call))
            and len(ins.operands) == 1
            and ins.operands[0].type == op_imm
        ):
            target = ins.operands[0].imm
        _, written = ins.regs_access()
        writes = frozenset(_GPR.get(n, n) for n in (ins.reg_name(r) for r in written) if n)
        # "repz ret" and "bnd ret" are RETs too
        mnemonic = "ret" if ins.mnemonic.split()[-1] == "ret" else ins.mnemonic
        out.append(
            Instruction(
                ins.address, ins.size, mnemonic, ins.op_str, bytes(ins.bytes), target, writes
            )
        )
    return out


@parse_guard
def disassemble(binary: GoBinary, addr: int, size: int) -> list[Instruction]:
    """Linear sweep of [addr, addr+size). Undecodable bytes become 1-byte "(bad)" entries
    and decoding resumes after them, so the list always covers the whole range."""
    code = binary.read(addr, size)
    out: list[Instruction] = []
    off = 0
    while off < len(code):
        chunk = _decode(code[off:], addr + off)
        out.extend(chunk)
        if chunk:
            off = chunk[-1].end - addr
        if off < len(code):  # capstone stops at the first byte it cannot decode
            bad = code[off : off + 1]
            out.append(Instruction(addr + off, 1, "(bad)", f"{bad[0]:#04x}", bad))
            off += 1
    return out


@dataclass(frozen=True)
class ProbeSite:
    """One place to attach a uprobe.

    `file_offset` is what the kernel's uprobe (perf_event_open, uprobe_events, libbpf)
    attaches at. BCC's `attach_uprobe(addr=...)` wants `vaddr` instead and maps it to
    the same file offset itself (BCC 0.26); handing it `file_offset` fails, for Go PIE
    too, since Go links PIE executables at 0x400000 like the others.
    """

    symbol: str
    vaddr: int
    file_offset: int
    instruction: str  # "push rbp", "ret", "call 0x441540"
    emulated: bool


@dataclass(frozen=True)
class FunctionProbes:
    """What `goleash inspect` shows for a function, and where a latency probe goes."""

    symbol: str
    entry: int  # the function's first instruction (vaddr)
    entry_file_offset: int
    stack_check: bool  # False for nosplit / frameless functions
    after_check: ProbeSite  # first instruction after the stack-growth check
    entry_probe: ProbeSite  # emulated site still carrying R14 (g); == after_check on Go >= 1.21
    rets: list[ProbeSite]
    tail_calls: list[ProbeSite]  # `jmp` out of the function: exits that bypass every RET


class _Function:
    """One function's instructions plus the facts the site choices share."""

    def __init__(self, binary: GoBinary, symbol: str, addr: int, size: int) -> None:
        if size <= 0:
            raise ProbeSiteError(
                f"{symbol} at {addr:#x} has no size; look it up in pclntab instead of .symtab"
            )
        self.binary = binary
        self.symbol = symbol
        self.addr = addr
        self.size = size
        self.insns = disassemble(binary, addr, size)
        self.index = {ins.address: k for k, ins in enumerate(self.insns)}

    def site(self, ins: Instruction) -> ProbeSite:
        return ProbeSite(
            self.symbol,
            ins.address,
            self.binary.vaddr_to_offset(ins.address),
            ins.text,
            ins.is_emulated,
        )

    def contains(self, vaddr: int) -> bool:
        return self.addr <= vaddr < self.addr + self.size

    @cached_property
    def body(self) -> int:
        """Index of the first instruction past the stack-growth check (0 without one)."""
        return _after_stack_check(self.insns, self.index)

    @cached_property
    def branch_targets(self) -> frozenset[int]:
        return frozenset(i.target for i in self.insns if i.target is not None)


_GUARD = re.compile(r"^(\w+), qword ptr \[(\w+) \+ 0x10\]$")  # cmp SP, g.stackguard0
_SP_FROM = re.compile(r"^(\w+), (?:rsp|\[rsp - 0x[0-9a-f]+\])$")  # mov/lea X, rsp-N
_TLS_G = re.compile(r"^(\w+), qword ptr fs:\[0xfffffffffffffff8\]$")  # ABI0 asm: g from TLS
_PROLOGUE_SCAN = 8  # the huge-frame check is the longest: mov, sub, jb, cmp, jbe


def _after_stack_check(insns: list[Instruction], index: dict[int, int]) -> int:
    """Find Go's stack-growth check at the top of a function.

    Forms (all toolchains 1.19..1.27): `cmp rsp, [r14+0x10]`; for frames over 128
    bytes `lea r12, [rsp-N]; cmp r12, [r14+0x10]`; for frames over 4 KiB
    `mov r12, rsp; sub r12, N; jb morestack; cmp r12, [r14+0x10]`; assembly (ABI0)
    functions load g from TLS first. The check is followed by `jbe`/`jb` to the
    morestack call at the end of the function; an inverted layout (`ja`/`jae` to the
    body) is taken too.
    """
    g_regs = {"r14"}
    sp_regs = {"rsp"}
    for k, ins in enumerate(insns[:_PROLOGUE_SCAN]):
        if ins.mnemonic == "cmp":
            m = _GUARD.match(ins.op_str)
            if m and m.group(1) in sp_regs and m.group(2) in g_regs and k + 1 < len(insns):
                jump = insns[k + 1]
                if jump.mnemonic in ("jbe", "jb"):
                    return k + 2
                if jump.mnemonic in ("ja", "jae") and jump.target in index:
                    return index[jump.target]
            return 0
        if ins.mnemonic in ("mov", "lea"):
            if m := _TLS_G.match(ins.op_str):
                g_regs.add(m.group(1))
                continue
            if m := _SP_FROM.match(ins.op_str):
                sp_regs.add(m.group(1))
                continue
        if ins.mnemonic == "sub" and ins.op_str.split(",")[0] in sp_regs - {"rsp"}:
            continue
        if ins.mnemonic == "jb":  # huge frames: SP-N wrapped below zero
            continue
        return 0
    return 0


def _entry(fn: _Function) -> ProbeSite:
    if fn.body >= len(fn.insns) or fn.insns[fn.body].mnemonic in ("int3", "(bad)"):
        raise ProbeSiteError(f"{fn.symbol} at {fn.addr:#x}: no code after its stack check")
    return fn.site(fn.insns[fn.body])


@parse_guard
def entry_site(binary: GoBinary, symbol: str, addr: int, size: int) -> ProbeSite:
    """The first instruction after the stack-growth check (the function's first one when
    it has none). Fires once per call. `push rbp` on Go >= 1.21, `sub rsp` on 1.19."""
    return _entry(_Function(binary, symbol, addr, size))


def _emulated_entry(fn: _Function, keep: Collection[str]) -> ProbeSite:
    keep = frozenset(keep)
    for k in range(fn.body, len(fn.insns)):
        ins = fn.insns[k]
        # A jump into the entry block would make a later site fire more than once per call.
        if k > fn.body and ins.address in fn.branch_targets:
            break
        if ins.is_emulated:
            return fn.site(ins)
        if ins.writes & keep or ins.ends_block:
            break
    return _entry(fn)


@parse_guard
def emulated_entry_site(
    binary: GoBinary, symbol: str, addr: int, size: int, keep: Collection[str] = ("r14",)
) -> ProbeSite:
    """The cheapest once-per-call entry site whose registers `keep` still hold their
    values at entry: the first emulated instruction of the straight line after the stack
    check, before any of `keep` is written. Falls back to `entry_site` (single-stepped)
    when there is none. The frame may already be set up there (RSP lowered, RBP the
    new frame), so read arguments from registers, not from the stack."""
    return _emulated_entry(_Function(binary, symbol, addr, size), keep)


@parse_guard
def return_sites(binary: GoBinary, symbol: str, addr: int, size: int) -> list[ProbeSite]:
    """Every RET of the function. The morestack tail and the int3 padding have none."""
    fn = _Function(binary, symbol, addr, size)
    return [fn.site(i) for i in fn.insns if i.is_ret]


def _tail_calls(fn: _Function) -> list[ProbeSite]:
    # Only direct jumps can be told apart: Go-compiled code's indirect `jmp reg` are
    # switch jump tables inside the function; Go's tail calls (method and ABI wrappers,
    # assembly `JMP runtime·f(SB)`) are direct.
    return [
        fn.site(i)
        for i in fn.insns
        if i.is_jmp and i.target is not None and not fn.contains(i.target)
    ]


@parse_guard
def tail_call_sites(binary: GoBinary, symbol: str, addr: int, size: int) -> list[ProbeSite]:
    """Direct `jmp`s leaving the function: exits that no RET probe sees."""
    return _tail_calls(_Function(binary, symbol, addr, size))


@parse_guard
def call_sites(binary: GoBinary, symbol: str, addr: int, size: int, target: int) -> list[ProbeSite]:
    """Every direct `call target` in the function (emulated: the callee's arguments are
    in their registers there)."""
    fn = _Function(binary, symbol, addr, size)
    return [fn.site(i) for i in fn.insns if i.is_call and i.target == target]


@parse_guard
def function_probes(binary: GoBinary, symbol: str, addr: int, size: int) -> FunctionProbes:
    fn = _Function(binary, symbol, addr, size)
    return FunctionProbes(
        symbol=symbol,
        entry=addr,
        entry_file_offset=binary.vaddr_to_offset(addr),
        stack_check=fn.body > 0,
        after_check=_entry(fn),
        entry_probe=_emulated_entry(fn, ("r14",)),
        rets=[fn.site(i) for i in fn.insns if i.is_ret],
        tail_calls=_tail_calls(fn),
    )


# --- the runtime sites goleash uses ---------------------------------------------------

CreateKind = Literal["runqput_call", "newproc1_ret"]


@dataclass(frozen=True)
class GoroutineProbeSites:
    """Where goleash watches goroutines live and die.

    create: the `call runtime.runqput` in runtime.newproc.func1; the new g is in RBX.
    If that call cannot be found, create is None and create_rets holds every RET of
    runtime.newproc1 (it runs on the system stack, the new g is in RAX).
    Goroutines made by `runtime.newcoro` (iter.Pull, Go >= 1.23) pass neither site
    nor goexit1: they are invisible to both ends, so they never look leaked.
    """

    create_kind: CreateKind
    create: ProbeSite | None
    create_rets: list[ProbeSite]
    exit: ProbeSite  # runtime.goexit1 after its check: R14 is the exiting g
    newproc_entry: ProbeSite  # runtime.newproc: R14 is the creator; for its user stack
    gopark: ProbeSite  # RAX unlockf, RBX lock, RCX wait reason, R14 the parking g
    gopanic: ProbeSite  # RAX, RBX the panic value (eface), R14 the panicking g

    @property
    def create_sites(self) -> list[ProbeSite]:
        return [self.create] if self.create is not None else self.create_rets

    @property
    def new_g_register(self) -> Literal["rbx", "rax"]:
        return "rbx" if self.create_kind == "runqput_call" else "rax"


def _need(lookup: SymbolLookup, name: str, binary: GoBinary) -> tuple[int, int]:
    found = lookup(name)
    if found is None:
        raise SymbolNotFoundError(
            f"{binary.path}: {name} not found; goleash needs it to follow goroutines "
            "(is this a Go >= 1.19 executable, and was the symbol table read?)"
        )
    return found


def goroutine_probe_sites(binary: GoBinary, lookup: SymbolLookup) -> GoroutineProbeSites:
    """The goroutine probes' sites in BINARY, disassembled once per content: every
    process of one executable (and of its copies, see gobin.shared) attaches at the
    same file offsets, so the agent does not disassemble per process."""
    memo = binary.memo
    if memo is None:
        return _goroutine_probe_sites(binary, lookup)
    found = memo.get("goroutine_probe_sites")
    if found is None:
        found = memo["goroutine_probe_sites"] = _goroutine_probe_sites(binary, lookup)
    return found  # type: ignore[no-any-return]


@parse_guard
def _goroutine_probe_sites(binary: GoBinary, lookup: SymbolLookup) -> GoroutineProbeSites:
    create_kind: CreateKind = "runqput_call"
    create: ProbeSite | None = None
    create_rets: list[ProbeSite] = []
    closure, runqput = lookup("runtime.newproc.func1"), lookup("runtime.runqput")
    if closure is not None and runqput is not None:
        calls = call_sites(binary, "runtime.newproc.func1", *closure, target=runqput[0])
        if len(calls) == 1:
            create = calls[0]
    if create is None:
        create_kind = "newproc1_ret"
        create_rets = return_sites(
            binary, "runtime.newproc1", *_need(lookup, "runtime.newproc1", binary)
        )
        if not create_rets:
            raise ProbeSiteError(
                f"{binary.path}: neither a call to runtime.runqput in runtime.newproc.func1 "
                "nor a RET in runtime.newproc1; cannot see goroutines being created"
            )

    def entry(name: str, keep: tuple[str, ...]) -> ProbeSite:
        return emulated_entry_site(binary, name, *_need(lookup, name, binary), keep=keep)

    return GoroutineProbeSites(
        create_kind=create_kind,
        create=create,
        create_rets=create_rets,
        exit=entry("runtime.goexit1", ("r14",)),
        newproc_entry=entry("runtime.newproc", ("r14",)),
        gopark=entry("runtime.gopark", ("r14", "rax", "rbx", "rcx")),
        gopanic=entry("runtime.gopanic", ("r14", "rax", "rbx")),
    )
