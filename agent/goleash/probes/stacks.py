"""Stacks of parked goroutines, walked from outside by frame pointers.

Go on amd64 keeps frame pointers: every function with a frame saves the caller's
BP at [BP] and has its return address at [BP+8] (runtime/tracestack.go
fpTracebackPCs walks the same chain). For a goroutine that is not on a CPU,
`g.sched` says where it stopped:

- parked (gopark -> mcall, asm_amd64.s): sched.pc is the return address into the
  function that called mcall (gopark) and sched.bp is that function's frame. Go
  1.19/1.20 store mcall's incoming BP, which is that frame since mcall has none;
  Go 1.21+ store `(BP)` after mcall's own BP push (CL 476235): the same frame.
- syscall (entersyscall -> save): sched.pc/sp are the caller of entersyscall.
  Go 1.23+ save its frame pointer too; before 1.23 save() leaves sched.bp stale,
  so only the first frame is known.
- never run yet (newproc1 -> gostartcallfn): sched.pc is the start function's
  entry, sched.bp 0, and [sched.sp] the return address into runtime.goexit.
- running: its registers are on a CPU of another thread; nothing to walk.

The walk stops at runtime.goexit (the bottom of every goroutine), when BP leaves
[stack.lo, stack.hi) or does not grow, or after `max_frames`. The stack can change
under the walk (the goroutine wakes up): a walk that goes astray stops early.
Inlined calls are expanded into frames of their own, as the runtime prints them.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from dataclasses import dataclass

from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import UnsupportedGoVersionError, parse_go_version
from goleash.gobin.pclntab import MAGIC_GO116, MAGIC_GO120
from goleash.probes.inventory import Goroutine
from goleash.probes.target import GoProcess

MAX_FRAMES = 64
_MAX_STACK_READ = 1 << 20  # stacks larger than this are walked in pieces
_GOEXIT = "runtime.goexit"
_ASYNC_PREEMPT = "runtime.asyncPreempt"


@dataclass(frozen=True)
class Frame:
    pc: int  # link-time; a return address except for a goroutine's first frame at entry
    function: str
    file: str
    line: int
    entry: int  # the function's entry (link-time): the runtime prints "+0x(pc-entry)"
    inlined: bool = False  # a call the compiler inlined into the next frame's function

    @property
    def offset(self) -> int:
        return self.pc - self.entry


@dataclass(frozen=True)
class Stack:
    frames: list[Frame]
    complete: bool  # the walk reached runtime.goexit
    note: str | None = None  # why there are no (or not all) frames


class _Symbolizer:
    """PC -> the logical frames there, innermost first, inlined calls expanded.

    A physical frame's PC can sit in code inlined from other functions: pclntab
    records, per function, an inline tree (FUNCDATA_InlTree, an array of
    runtime.inlinedCall) and a PC -> tree index table (PCDATA_InlTreeIndex, -1 where
    the code is the function's own). Each tree node names the inlined function and
    the parentPc whose position is the call site; runtime/symtabinl.go's unwinder
    (traceback.go's loop before Go 1.21) walks it the same way. Funcdata offsets are
    relative to moduledata.gofunc (Go 1.18+), which follows moduledata.rodata, the
    word equal to the .rodata section's address. inlinedCall is 20 bytes before the
    Go 1.20 pclntab (nameOff at 12, parentPc at 16), 16 bytes after (4, 8).
    Anything unexpected gives the physical frame alone, never an error.
    """

    _PCDATA_INL_INDEX = 2
    _FUNCDATA_INL_TREE = 3

    def __init__(self, proc: GoProcess) -> None:
        # Kept per binary in a WeakKeyDictionary: holding the binary (or the process,
        # which holds it) would keep the key alive, its mapping and fd with it, forever.
        self._binary = weakref.ref(proc.binary)
        self.tab = proc.pclntab
        self.cache: dict[tuple[int, bool], tuple[Frame, ...]] = {}
        self.gofunc = self._gofunc(proc)
        self.node = (16, 4, 8) if self.tab.magic == MAGIC_GO120 else (20, 12, 16)

    def _gofunc(self, proc: GoProcess) -> int | None:
        tab, binary = self.tab, proc.binary
        rodata = binary.section(".rodata")
        if tab.moduledata is None or rodata is None or tab.magic == MAGIC_GO116:
            return None
        try:
            words = struct.unpack("<64Q", binary.read(tab.moduledata, 64 * 8))
        except Exception:
            return None
        # moduledata.rodata by its place in the struct (runtime/symtab.go): an external
        # linker (cgo) puts C's read-only data first, so it is not .rodata's start.
        at = _rodata_word(proc.build_info.go_version)
        if at is not None and 0 < words[at] <= words[at + 1]:
            return words[at + 1]
        found = [i for i in range(24, 63) if words[i] == rodata.vaddr]
        return words[found[-1] + 1] if found else None

    def frames(self, pc: int, exact: bool) -> tuple[Frame, ...]:
        key = (pc, exact)
        out = self.cache.get(key)
        if out is None:
            out = self.cache[key] = self._frames(pc, exact)
        return out

    def _frames(self, pc: int, exact: bool) -> tuple[Frame, ...]:
        tab = self.tab
        f = tab.func_for_pc(pc)
        if f is None:
            return (Frame(pc, f"{pc:#x}", "?", 0, pc),)
        # A return address's line is the CALL's: look one byte back, as the runtime's
        # traceback does; not when the PC is the entry (a goroutine that has not run)
        # or was interrupted there (the frame under runtime.asyncPreempt).
        tracepc = pc - 1 if pc > f.entry and not exact else pc
        out: list[Frame] = []
        try:
            inlined, tracepc = self._inlined(f.entry, tracepc)
        except Exception:
            inlined = []  # a damaged or unexpected inline tree: the physical frame alone
        for name, at in inlined:
            src = tab.source_line(at)
            file, line = (src.file, src.line) if src else ("?", 0)
            out.append(Frame(pc, name, file, line, f.entry, inlined=True))
        src = tab.source_line(tracepc)
        file, line = (src.file, src.line) if src else ("?", 0)
        out.append(Frame(pc, f.name, file, line, f.entry))
        return tuple(out)

    def _inlined(self, entry: int, tracepc: int) -> tuple[list[tuple[str, int]], int]:
        """(inlined function, PC whose line is its position) pairs, innermost first,
        and the PC whose line is the physical function's (the outermost call site)."""
        tab = self.tab
        none: tuple[list[tuple[str, int]], int] = ([], tracepc)
        binary = self._binary()
        if self.gofunc is None or binary is None:
            return none
        i = tab._index_for_pc(entry)
        if i is None:
            return none
        buf = tab._buf
        fo = tab._pclntable + tab._funcoffs[i]
        npcdata = tab._func_field(fo, 7)
        nfuncdata = buf[fo + tab._funcid_off + 3]
        if npcdata <= self._PCDATA_INL_INDEX or nfuncdata <= self._FUNCDATA_INL_TREE:
            return none
        base = fo + tab._funcid_off + 4
        (pcdata,) = struct.unpack_from("<I", buf, base + 4 * self._PCDATA_INL_INDEX)
        (tree,) = struct.unpack_from("<I", buf, base + 4 * (npcdata + self._FUNCDATA_INL_TREE))
        if pcdata == 0 or tree == 0xFFFFFFFF:
            return none
        size, name_at, parent_at = self.node
        out: list[tuple[str, int]] = []
        pc = tracepc
        for _ in range(64):  # inlining depth is small; a cycle would be damage
            ix = tab._pcvalue(pcdata, entry, pc)
            if ix < 0:
                return out, pc
            node = binary.read(self.gofunc + tree + ix * size, size)
            (name_off,) = struct.unpack_from("<i", node, name_at)
            (parent_pc,) = struct.unpack_from("<i", node, parent_at)
            out.append((tab._cstring(tab._funcnametab + name_off), pc))
            pc = entry + parent_pc
        return none


def _rodata_word(go_version: str) -> int | None:
    """The index of moduledata.rodata in 8-byte words (gofunc is the next word):
    covctrs/ecovctrs came in Go 1.20, typedesclen, itaboffset and itabsize in 1.27.
    None for a release whose layout is not known here."""
    try:
        major, minor, _ = parse_go_version(go_version)
    except UnsupportedGoVersionError:
        return None
    if major != 1 or not 18 <= minor <= 27:
        return None
    return 37 if minor < 20 else 39 if minor < 27 else 42


_symbolizers: weakref.WeakKeyDictionary[GoBinary, _Symbolizer] = weakref.WeakKeyDictionary()


def _frames(proc: GoProcess, pc: int, exact: bool = False) -> tuple[Frame, ...]:
    """The logical frames at a physical frame's PC, cached per binary (goroutines share
    their PCs)."""
    sym = _symbolizers.get(proc.binary)
    if sym is None:
        sym = _symbolizers[proc.binary] = _Symbolizer(proc)
    return sym.frames(pc, exact)


class _StackMemory:
    """The goroutine's stack bytes from sched.sp up, read once."""

    def __init__(self, proc: GoProcess, g: Goroutine, data: bytes | None) -> None:
        self.proc = proc
        self.lo = g.sched_sp if g.stack_lo <= g.sched_sp < g.stack_hi else g.stack_lo
        self.hi = g.stack_hi
        self.data = data
        self.read_elsewhere = False  # the walk needed bytes outside `data`

    def u64_pair(self, addr: int) -> tuple[int, int] | None:
        if self.data is not None and self.lo <= addr and addr + 16 <= self.lo + len(self.data):
            return struct.unpack_from("<2Q", self.data, addr - self.lo)
        self.read_elsewhere = True
        raw = self.proc.memory.read_many([(addr, 16)])[0]
        return None if raw is None else struct.unpack("<2Q", raw)


def _stack_range(g: Goroutine) -> tuple[int, int] | None:
    if not g.stack_lo <= g.sched_sp < g.stack_hi:
        return None
    return g.sched_sp, min(g.stack_hi - g.sched_sp, _MAX_STACK_READ)


def walk_stack(
    proc: GoProcess, g: Goroutine, max_frames: int = MAX_FRAMES, data: bytes | None = None
) -> Stack:
    """The frames of a goroutine that is not running, innermost first.

    `data` is the stack's bytes from sched.sp up, when the caller read them already
    (walk_stacks reads many stacks in one batch).
    """
    if g.status == "running":
        return Stack([], False, "goroutine running on other thread; stack unavailable")
    if not g.sched_pc:
        return Stack([], False, "no saved PC; stack unavailable")
    if data is None and (rng := _stack_range(g)) is not None:
        data = proc.memory.read_many([rng])[0]
    return _walk(proc, g, max_frames, _StackMemory(proc, g, data))


def _walk(proc: GoProcess, g: Goroutine, max_frames: int, mem: _StackMemory) -> Stack:
    bias = proc.load_bias
    frames: list[Frame] = []
    pc, bp = g.sched_pc, g.sched_bp
    old_syscall = g.status == "syscall" and proc.build_info.version < (1, 23, 0)
    exact, physical = False, 0
    tab = proc.pclntab
    text = (tab._entries[0], tab._entries[-1]) if tab._entries else (0, 0)
    while True:
        if not text[0] <= pc < text[1]:
            # A torn or damaged read (a zero or stale PC rebased below the binary):
            # the frame is unknown and nothing after it can be trusted.
            frames.append(Frame(max(0, pc) if pc < 1 << 64 else 0, "?", "?", 0, 0))
            return Stack(frames, False, "PC outside the program's code (changed while read?)")
        logical = _frames(proc, pc, exact)
        fr = logical[-1]  # the physical function; inlined calls come before it
        if fr.function == _GOEXIT:
            return Stack(frames, True)
        if len(frames) + len(logical) > max_frames:
            return Stack(frames, False, "...additional frames elided...")
        frames.extend(logical)
        physical += 1
        if old_syscall:
            return Stack(frames, False, "in a system call: Go < 1.23 saves no frame pointer")
        if bp == 0 and physical == 1:
            # Never run: the start function at its entry, goexit's return address at sp.
            pair = mem.u64_pair(g.sched_sp)
            if pair is not None and _frames(proc, pair[0] - bias)[-1].function == _GOEXIT:
                return Stack(frames, True)
            return Stack(frames, False, "frame pointer chain ends")
        if not (g.stack_lo <= bp < g.stack_hi) or bp % 8:
            return Stack(frames, False, "frame pointer chain leaves the stack")
        pair = mem.u64_pair(bp)
        if pair is None:
            return Stack(frames, False, "stack unreadable (the goroutine moved on)")
        next_bp, ret = pair
        if not ret:
            return Stack(frames, False, "frame pointer chain ends")
        if next_bp and next_bp <= bp:
            return Stack(frames, False, "frame pointer chain does not grow (stack changed?)")
        # asyncPreempt's "return address" is where a signal interrupted its caller.
        pc, bp, exact = ret - bias, next_bp, fr.function == _ASYNC_PREEMPT


# A walk's inputs: the goroutine's saved registers and stack bounds, the frame limit,
# and a digest of its stack bytes.
StackKey = tuple[int, int, int, int, int, int, int, int, bytes]


def _stack_key(g: Goroutine, max_frames: int, data: bytes) -> StackKey:
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return (
        g.goid,
        g.status_code,
        g.sched_pc,
        g.sched_sp,
        g.sched_bp,
        g.stack_lo,
        g.stack_hi,
        max_frames,
        digest,
    )


def walk_stacks(
    proc: GoProcess,
    goroutines: list[Goroutine],
    max_frames: int = MAX_FRAMES,
    memo: dict[StackKey, Stack] | None = None,
) -> dict[int, Stack]:
    """walk_stack for many goroutines, their stack bytes read in batched system calls.

    Keyed by goid. With `memo` (the caller's, kept between calls for one process), a
    goroutine whose registers and stack bytes are what they were last time is not
    walked again: a walk reads nothing else (when it did, it is not memoised), so
    the same inputs give the same frames. An idle process's parked goroutines are
    the common case. `memo` is left holding only this call's stacks (bounded)."""
    wanted = [(g, _stack_range(g)) for g in goroutines if g.status != "running"]
    ranges = [rng for _, rng in wanted if rng is not None]
    datas = iter(proc.memory.read_many(ranges))
    out: dict[int, Stack] = {}
    kept: dict[StackKey, Stack] = {}
    for g, rng in wanted:
        data = next(datas) if rng else None
        if memo is None or data is None or not g.sched_pc:
            out[g.goid] = walk_stack(proc, g, max_frames, data)
            continue
        key = _stack_key(g, max_frames, data)
        st = memo.get(key)
        if st is None:
            mem = _StackMemory(proc, g, data)
            st = _walk(proc, g, max_frames, mem)
            if mem.read_elsewhere:
                out[g.goid] = st
                continue
        kept[key] = out[g.goid] = st
    for g in goroutines:
        if g.goid not in out:
            out[g.goid] = walk_stack(proc, g, max_frames)
    if memo is not None:
        memo.clear()
        memo.update(kept)
    return out
