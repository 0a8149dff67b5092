"""Every goroutine of a running Go process, read from its memory without stopping it.

The runtime keeps every g it ever allocated in `runtime.allgs` (proc.go): a g is
never freed, a dead one is put on a free list and reused by a later `go`
statement. `allgadd` appends under a lock and then publishes the pair
(`allgptr` first, then `allglen`), so reading allglen before allgptr gives an
array with at least allglen entries, as the runtime's own lock-free
`forEachGRace` does. Each g is then read in one range (the span of the fields
used), up to 1024 gs per system call.

Nothing is locked: a g may be reused or change state while it is read. Such a
read is "torn": it is counted, never trusted, never fatal.

In a stripped binary (no .symtab) there are no data symbols; allgs is found from
the code of `runtime.allgadd` (a function of its own on Go 1.19..1.27): the slice
is the RIP-relative address referenced together with its +8 (len) and +16 (cap),
checked by reading it (len <= cap, and allgs[0] is goroutine 1, which the runtime
itself relies on in mgc.go). Wait reason names come from the binary's own
`runtime.waitReasonStrings` ([N]string), found by symbol or from the code of
`runtime.waitReason.String`: never a numbering hard-coded here.
"""

from __future__ import annotations

import re
import struct
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from goleash.errors import printable
from goleash.gobin.binary import GoBinary
from goleash.gobin.disasm import Instruction, disassemble
from goleash.gobin.errors import BinaryError, ProcessError, SymbolNotFoundError
from goleash.probes.procmem import MemoryFault
from goleash.probes.target import GoProcess

# runtime2.go: g.atomicstatus values. Stable since Go 1.4; _Gleaked and
# _Gdeadextra were added in Go 1.26. The names are the runtime's gStatusStrings.
STATUS_NAMES: dict[int, str] = {
    0: "idle",
    1: "runnable",
    2: "running",
    3: "syscall",
    4: "waiting",
    5: "moribund_unused",
    6: "dead",
    7: "enqueue_unused",
    8: "copystack",
    9: "preempted",
    10: "leaked",
    11: "waiting for cgo callback",
}
_G_IDLE, _G_WAITING, _G_SYSCALL, _G_DEAD, _G_LEAKED, _G_DEADEXTRA = 0, 4, 3, 6, 10, 11
_G_SCAN = 0x1000
# Not goroutines a program has: never started (idle: newproc1 turns it dead at once),
# finished (dead), or a g kept for a cgo callback on an extra M (Go 1.26+).
_NOT_LIVE = {_G_IDLE, _G_DEAD, _G_DEADEXTRA}
# A sanity bound on what another process's memory can make us read: 4M gs (~1.6 GiB
# of g structs in the target) is 32 MiB of pointers here per snapshot.
_MAX_ALLGS = 1 << 22

_RIP_REL = re.compile(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]")


@dataclass(frozen=True)
class Goroutine:
    """One live goroutine as read from the process.

    Code addresses (gopc, startpc, sched_pc) are link-time, ready for pclntab; data
    addresses (g_addr, sched_sp, sched_bp, stack_lo, stack_hi) are the process's own.
    """

    goid: int
    parent_goid: int | None  # g.parentGoid, Go 1.21+; None before (0: created by no g)
    status: str  # "running", "runnable", "waiting", "syscall", ... (the _Gscan bit masked)
    # The binary's own name for the wait ("chan receive", "select", "sleep", ...); set
    # for status "waiting" (and "leaked") only, as the runtime's goroutine header does.
    wait_reason: str | None
    # g.waitsince, runtime nanotime (CLOCK_MONOTONIC, comparable with Inventory.read_ns);
    # 0 if not (yet) known. The runtime sets it lazily, only for its "N minutes": when
    # a GC's mark phase scans a goroutine that is waiting (or in a syscall) with
    # waitsince 0, it stores work.tstart (mgcmark.go markroot), which gcMark sets at
    # the *previous* cycle's mark termination; execute() and exitsyscall() reset it
    # to 0. So it stays 0 until the second GC cycle after the goroutine blocked
    # started (the first GC of a program stores 0), and then it can be earlier
    # than the real start of the wait by up to one GC interval.
    wait_since_ns: int
    gopc: int  # return address after the CALL of the `go` statement (0 for goroutine 1's)
    startpc: int  # entry of the function the goroutine started with
    g_addr: int
    sched_pc: int  # where a parked goroutine resumes
    sched_sp: int
    sched_bp: int
    stack_lo: int
    stack_hi: int
    status_code: int  # raw g.atomicstatus (with the _Gscan bit)

    @property
    def parked(self) -> bool:
        """Not on a CPU: its g.sched describes where it stopped (stacks.py walks it)."""
        return self.status not in ("running", "syscall")


@dataclass(frozen=True)
class Inventory:
    goroutines: list[Goroutine]
    read_ns: int  # CLOCK_MONOTONIC when the read started (the clock of wait_since_ns)
    torn: int  # gs that changed or vanished while read, skipped
    read_ms: float  # how long the whole read took
    allglen: int  # g structs the runtime has (live, dead and reusable)


@dataclass(frozen=True)
class _Layout:
    """Where the runtime keeps its gs in this binary, and how to decode one."""

    allgs: int  # link-time address of the allgs slice header
    allglen: int | None  # of runtime.allglen / runtime.allgptr, when known
    allgptr: int | None
    wait_reasons: tuple[str, ...]


_layouts: weakref.WeakKeyDictionary[GoBinary, _Layout] = weakref.WeakKeyDictionary()


_SIZE_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _g_fields(proc: GoProcess) -> list[tuple[str, int, str]]:
    """(name, offset in runtime.g, struct format) of every g field read."""
    o = proc.offsets
    out = [
        ("goid", o.g_goid, "Q"),
        ("gopc", o.g_gopc, "Q"),
        ("startpc", o.g_startpc, "Q"),
        ("status", o.g_atomicstatus, _SIZE_FMT[o.g_atomicstatus_size]),
        ("reason", o.g_waitreason, _SIZE_FMT[o.g_waitreason_size]),
        ("since", o.g_waitsince, "q"),
        ("sched_pc", o.g_sched_pc, "Q"),
        ("sched_sp", o.g_sched_sp, "Q"),
        ("sched_bp", o.g_sched_bp, "Q"),
        ("stack_lo", o.g_stack_lo, "Q"),
        ("stack_hi", o.g_stack_hi, "Q"),
    ]
    if o.g_parent_goid is not None:
        out.append(("parent", o.g_parent_goid, "Q"))
    return out


class _Decoder:
    """The g fields goleash reads, unpacked from one read span by one Struct call
    (100k goroutines: one call each instead of a dozen)."""

    def __init__(self, proc: GoProcess) -> None:
        fields = sorted(_g_fields(proc), key=lambda f: f[1])
        self.span_lo = fields[0][1]
        fmt, pos = "<", self.span_lo
        for _, off, code in fields:
            if off < pos:
                raise BinaryError(f"runtime.g fields overlap at offset {off}: bad offsets")
            fmt += "x" * (off - pos) + code
            pos = off + struct.calcsize("<" + code)
        self.span_hi = pos
        self.unpack = struct.Struct(fmt).unpack_from
        self.index = {name: i for i, (name, _, _) in enumerate(fields)}


# --- finding allgs and the wait reason names ---------------------------------------


def _rip_targets(insns: list[Instruction]) -> list[tuple[Instruction, int]]:
    out = []
    for ins in insns:
        m = _RIP_REL.search(ins.op_str)
        if m:
            disp = int(m.group(2), 0)
            out.append((ins, ins.end + (disp if m.group(1) == "+" else -disp)))
    return out


def _function(proc: GoProcess, name: str) -> tuple[int, int]:
    f = proc.pclntab.func_by_name(name)
    if f is None:
        raise SymbolNotFoundError(
            f"PID {proc.pid}: no function {name} in the binary; cannot find the goroutine "
            f"list of this Go version ({proc.go_version})"
        )
    return f.entry, f.end - f.entry


def _allgs_candidates(proc: GoProcess) -> tuple[list[int], set[int]]:
    """Slice headers referenced by runtime.allgadd, and every address it references."""
    addr, size = _function(proc, "runtime.allgadd")
    targets = {t for _, t in _rip_targets(disassemble(proc.binary, addr, size))}
    # allgs = append(allgs, gp) touches the slice's ptr, len and cap words.
    slices = sorted(t for t in targets if t + 8 in targets and t + 16 in targets)
    return slices, targets


def _check_allgs(proc: GoProcess, allgs_link: int) -> bool:
    """The slice header at allgs_link looks like runtime.allgs of this process."""
    mem = proc.memory
    try:
        ptr, n, cap = struct.unpack("<3Q", mem.read(proc.runtime_addr(allgs_link), 24))
        if not (0 < n <= cap <= _MAX_ALLGS) or ptr == 0 or ptr % 8:
            return False
        g0 = mem.read_u64(ptr)
        return g0 != 0 and mem.read_u64(g0 + proc.offsets.g_goid) == 1
    except MemoryFault:
        return False


def _find_allgs(proc: GoProcess) -> tuple[int, int | None, int | None]:
    sym = proc.symbols.lookup
    hit = sym("runtime.allgs")
    if hit is not None:
        glen, gptr = sym("runtime.allglen"), sym("runtime.allgptr")
        return hit[0], glen[0] if glen else None, gptr[0] if gptr else None
    slices, targets = _allgs_candidates(proc)
    for base in slices:
        if not _check_allgs(proc, base):
            continue
        # allglen and allgptr are the referenced words holding the slice's len and ptr.
        ptr, n = struct.unpack("<2Q", proc.memory.read(proc.runtime_addr(base), 16))
        rest = sorted(targets - {base, base + 8, base + 16})
        words = proc.memory.read_many([(proc.runtime_addr(t), 8) for t in rest])
        len_at: int | None = None
        ptr_at: int | None = None
        for t, w in zip(rest, words, strict=True):
            v = None if w is None else int.from_bytes(w, "little")
            if v == n and len_at is None:
                len_at = t
            elif v == ptr and ptr_at is None:
                ptr_at = t
        if len_at is None or ptr_at is None:
            len_at = ptr_at = None  # the slice header alone is still right
        return base, len_at, ptr_at
    raise SymbolNotFoundError(
        f"PID {proc.pid}: cannot locate runtime.allgs: the binary is stripped and the code "
        f"of runtime.allgadd ({proc.go_version}) references no slice that holds goroutine 1"
    )


def _read_go_string(binary: GoBinary, header: bytes) -> str | None:
    ptr, n = struct.unpack("<2Q", header)
    if n == 0:
        return ""
    if ptr == 0 or n > 256:
        return None
    try:
        return printable(binary.read(ptr, n).decode("utf-8"))
    except (BinaryError, UnicodeDecodeError):
        return None


def wait_reason_names(proc: GoProcess) -> tuple[str, ...]:
    """The binary's runtime.waitReasonStrings, indexed by g.waitreason."""
    binary = proc.binary
    hit = proc.symbols.lookup("runtime.waitReasonStrings")
    count: int | None = None
    if hit is not None and hit[1]:
        addr, count = hit[0], hit[1] // 16
    else:
        # waitReason.String: `cmp al, N` (bounds check) then `lea reg, [rip+array]`.
        entry, size = _function(proc, "runtime.waitReason.String")
        insns = disassemble(binary, entry, size)
        leas = [t for ins, t in _rip_targets(insns) if ins.mnemonic == "lea"]
        addr = -1
        for t in leas:
            first = _read_go_string(binary, binary.read(t, 16)) if t else None
            if first == "":  # waitReasonZero's name is the empty string
                addr = t
                break
        if addr < 0:
            raise SymbolNotFoundError(
                f"PID {proc.pid}: cannot find runtime.waitReasonStrings in the code of "
                "runtime.waitReason.String"
            )
        for ins in insns:
            m = re.fullmatch(r"[a-z0-9]+, (0x[0-9a-f]+|\d+)", ins.op_str)
            if ins.mnemonic == "cmp" and m:
                count = int(m.group(1), 0)
                break
    names: list[str] = []
    for i in range(count if count is not None else 256):
        s = _read_go_string(binary, binary.read(addr + 16 * i, 16))
        if s is None or (i > 0 and s == "" and count is None):
            break
        names.append(s)
    return tuple(names)


def _layout(proc: GoProcess) -> _Layout:
    lay = _layouts.get(proc.binary)
    if lay is not None and proc.binary in _unchecked:
        _unchecked.discard(proc.binary)
        if not _check_allgs(proc, lay.allgs):  # a wrong one given: found afresh
            lay = None
    if lay is None:
        allgs, allglen, allgptr = _find_allgs(proc)
        lay = _Layout(allgs, allglen, allgptr, wait_reason_names(proc))
        _layouts[proc.binary] = lay
    return lay


# --- reading --------------------------------------------------------------------------


def _g_pointers(proc: GoProcess, lay: _Layout, memo: ReadMemo | None = None) -> list[int]:
    mem = proc.memory
    if lay.allglen is not None and lay.allgptr is not None:
        # allglen before allgptr: one system call copies its ranges in order.
        n_raw, ptr_raw = mem.read_many(
            [(proc.runtime_addr(lay.allglen), 8), (proc.runtime_addr(lay.allgptr), 8)]
        )
        if n_raw is None or ptr_raw is None:  # read one by one: the error says which
            n_raw = mem.read(proc.runtime_addr(lay.allglen), 8)
            ptr_raw = mem.read(proc.runtime_addr(lay.allgptr), 8)
        n, ptr = int.from_bytes(n_raw, "little"), int.from_bytes(ptr_raw, "little")
    else:
        ptr, n = struct.unpack("<2Q", mem.read(proc.runtime_addr(lay.allgs), 16))
    if n == 0:
        return []
    if n > _MAX_ALLGS or ptr == 0:
        raise ProcessError(
            f"PID {proc.pid}: runtime.allgs reads as {n} goroutines at {ptr:#x}; "
            "the runtime layout of this binary is not what goleash expects"
        )
    if memo is not None and memo.allgs is not None and memo.allgs[:2] == (ptr, n):
        return memo.allgs[2]
    raw = mem.read(ptr, 8 * n)
    pointers = list(struct.unpack(f"<{n}Q", raw))
    if memo is not None:
        memo.allgs = (ptr, n, pointers) if n <= MEMO_MAX_GS else None
    return pointers


@dataclass
class ReadMemo:
    """What the previous read of one process found, kept by its caller between reads
    (see read_goroutines)."""

    # What a g read decoded to, by (its address, the bytes read): a Goroutine, None
    # (not live) or _TORN.
    decoded: dict[tuple[int, bytes], object] = field(default_factory=dict)
    # (allgptr, allglen, the g pointers read from that array): allgs only grows, and
    # the runtime never rewrites an entry below allglen (a g is never freed).
    allgs: tuple[int, int, list[int]] | None = None


_TORN = object()
_MISSING = object()
# Above this many gs a memo would hold too much memory for what it saves.
MEMO_MAX_GS = 4096


def read_goroutines(proc: GoProcess, memo: ReadMemo | None = None) -> Inventory:
    """Every live goroutine of the process (dead and never-started gs skipped).

    ProcessError when the process is gone or cannot be read; a g that cannot be read
    or decodes to nonsense (reused while read) is counted in `torn`.

    With MEMO (the caller's, kept between reads of this one process), the pointer
    array is not read again while allgs' address and length are unchanged, and a g
    whose bytes are what they were at the previous read is not decoded again: the
    same Goroutine object comes back (most gs of an idle process). MEMO is left
    holding only this read's gs.
    """
    started = time.perf_counter()
    read_ns = time.monotonic_ns()
    lay = _layout(proc)
    d = _Decoder(proc)
    pointers = [p for p in _g_pointers(proc, lay, memo) if p]
    span = d.span_hi - d.span_lo
    raws = proc.memory.read_many([(p + d.span_lo, span) for p in pointers])
    if memo is not None and len(pointers) <= MEMO_MAX_GS:
        out, torn = _decode_memoised(proc, lay, d, pointers, raws, memo.decoded)
    else:
        out, torn = _decode_all(proc, lay, d, pointers, raws)
    if not proc.alive():
        raise ProcessError(f"PID {proc.pid}: the process exited while goleash was reading it")
    return Inventory(
        goroutines=out,
        read_ns=read_ns,
        torn=torn,
        read_ms=(time.perf_counter() - started) * 1e3,
        allglen=len(pointers),
    )


def _decode_memoised(
    proc: GoProcess,
    lay: _Layout,
    d: _Decoder,
    pointers: list[int],
    raws: Sequence[bytes | None],
    memo: dict[tuple[int, bytes], object],
) -> tuple[list[Goroutine], int]:
    """_decode_all, but the gs read as they were last time are taken from MEMO."""
    decode = _g_decoder(proc, lay, d)
    out: list[Goroutine] = []
    torn = 0
    kept: dict[tuple[int, bytes], object] = {}
    for p, raw in zip(pointers, raws, strict=True):
        if raw is None:
            torn += 1
            continue
        key = (p, raw)
        g = memo.get(key, _MISSING)
        if g is _MISSING:
            g = decode(p, raw)
        kept[key] = g
        if g is _TORN:
            torn += 1
        elif g is not None:
            out.append(g)  # type: ignore[arg-type]
    memo.clear()
    memo.update(kept)
    return out, torn


def _decode_all(
    proc: GoProcess,
    lay: _Layout,
    d: _Decoder,
    pointers: list[int],
    raws: Sequence[bytes | None],
) -> tuple[list[Goroutine], int]:
    """The live goroutines among the g structs read, and how many reads were torn."""
    decode = _g_decoder(proc, lay, d)
    out: list[Goroutine] = []
    torn = 0
    for p, raw in zip(pointers, raws, strict=True):
        g = _TORN if raw is None else decode(p, raw)
        if g is _TORN:
            torn += 1
        elif g is not None:
            out.append(g)  # type: ignore[arg-type]
    return out, torn


def _g_decoder(proc: GoProcess, lay: _Layout, d: _Decoder) -> Callable[[int, bytes], object]:
    """decode(address, bytes read) -> the Goroutine, None (not live) or _TORN. Everything
    it touches is bound here: it runs once per g, 100k times on a big process."""
    ix = d.index
    i_goid, i_parent, i_gopc, i_start = ix["goid"], ix.get("parent"), ix["gopc"], ix["startpc"]
    i_status, i_reason, i_since = ix["status"], ix["reason"], ix["since"]
    i_pc, i_sp, i_bp, i_lo, i_hi = (
        ix["sched_pc"],
        ix["sched_sp"],
        ix["sched_bp"],
        ix["stack_lo"],
        ix["stack_hi"],
    )
    unpack = d.unpack
    reasons = lay.wait_reasons
    bias = proc.load_bias
    entries = proc.pclntab._entries
    text_lo, text_hi = (entries[0], entries[-1]) if entries else (0, 0)

    def decode(p: int, raw: bytes) -> object:
        v = unpack(raw)
        code = v[i_status]
        base = code & ~_G_SCAN
        if base in _NOT_LIVE:
            return None
        name = STATUS_NAMES.get(base)
        goid, lo, hi, startpc = v[i_goid], v[i_lo], v[i_hi], v[i_start]
        if name is None or code & ~(_G_SCAN | 0xFF) or goid == 0 or not lo < hi or not startpc:
            return _TORN  # mid-reuse (newproc1 fills a dead g in several steps) or garbage
        gopc, spc = v[i_gopc], v[i_pc]
        if not text_lo <= startpc - bias < text_hi or (
            gopc and not text_lo <= gopc - bias <= text_hi
        ):
            return _TORN  # code addresses outside the program: not a g we can trust
        wait_reason = None
        if base in (_G_WAITING, _G_LEAKED):
            r = v[i_reason]
            if r:
                wait_reason = reasons[r] if r < len(reasons) else "unknown wait reason"
        since = v[i_since] if base in (_G_WAITING, _G_SYSCALL) else 0
        return Goroutine(
            goid=goid,
            parent_goid=None if i_parent is None else v[i_parent],
            status=name,
            wait_reason=wait_reason,
            wait_since_ns=since if since > 0 else 0,
            gopc=gopc - bias if gopc else 0,
            startpc=startpc - bias,
            g_addr=p,
            sched_pc=spc - bias if spc else 0,
            sched_sp=v[i_sp],
            sched_bp=v[i_bp],
            stack_lo=lo,
            stack_hi=hi,
            status_code=code,
        )

    return decode


# --- a layout found before ----------------------------------------------------------------


def found_layout(binary: GoBinary) -> tuple[int, int | None, int | None, tuple[str, ...]] | None:
    """(allgs, allglen, allgptr, wait reason names) found for BINARY so far, or None:
    for a caller that keeps it across runs (`goleash check`, by the file's content)."""
    lay = _layouts.get(binary)
    return None if lay is None else (lay.allgs, lay.allglen, lay.allgptr, lay.wait_reasons)


def use_layout(
    binary: GoBinary,
    allgs: int,
    allglen: int | None,
    allgptr: int | None,
    wait_reasons: tuple[str, ...],
) -> None:
    """What `found_layout` gave for the same bytes: finding it again in a stripped
    binary costs a name index of every function and a disassembly. Checked against
    the process at its first use, as a found one is (found afresh when wrong)."""
    _layouts[binary] = _Layout(allgs, allglen, allgptr, wait_reasons)
    _unchecked.add(binary)


_unchecked: weakref.WeakSet[GoBinary] = weakref.WeakSet()
