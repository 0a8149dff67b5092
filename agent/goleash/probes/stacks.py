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
Inlined calls are not expanded (pclntab's inline tree is not read): a frame is
the physical function with the innermost file:line at its PC.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

from goleash.gobin.binary import GoBinary
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

    @property
    def offset(self) -> int:
        return self.pc - self.entry


@dataclass(frozen=True)
class Stack:
    frames: list[Frame]
    complete: bool  # the walk reached runtime.goexit
    note: str | None = None  # why there are no (or not all) frames


_frame_caches: weakref.WeakKeyDictionary[GoBinary, dict[tuple[int, bool], Frame]] = (
    weakref.WeakKeyDictionary()
)


def _frame(proc: GoProcess, pc: int, exact: bool = False) -> Frame:
    # Many goroutines share their PCs: symbolize each once per binary.
    cache = _frame_caches.get(proc.binary)
    if cache is None:
        cache = _frame_caches[proc.binary] = {}
    fr = cache.get((pc, exact))
    if fr is None:
        fr = cache[(pc, exact)] = _symbolize(proc, pc, exact)
    return fr


def _symbolize(proc: GoProcess, pc: int, exact: bool) -> Frame:
    tab = proc.pclntab
    f = tab.func_for_pc(pc)
    if f is None:
        return Frame(pc, f"{pc:#x}", "?", 0, pc)
    # A return address's line is the CALL's: look one byte back, as the runtime's
    # traceback does; not when the PC is the entry (a goroutine that has not run) or
    # was interrupted there (the frame under runtime.asyncPreempt).
    src = tab.source_line(pc - 1 if pc > f.entry and not exact else pc)
    return Frame(pc, f.name, src.file if src else "?", src.line if src else 0, f.entry)


class _StackMemory:
    """The goroutine's stack bytes from sched.sp up, read once."""

    def __init__(self, proc: GoProcess, g: Goroutine, data: bytes | None) -> None:
        self.proc = proc
        self.lo = g.sched_sp if g.stack_lo <= g.sched_sp < g.stack_hi else g.stack_lo
        self.hi = g.stack_hi
        self.data = data

    def u64_pair(self, addr: int) -> tuple[int, int] | None:
        if self.data is not None and self.lo <= addr and addr + 16 <= self.lo + len(self.data):
            return struct.unpack_from("<2Q", self.data, addr - self.lo)
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
    mem = _StackMemory(proc, g, data)
    bias = proc.load_bias
    frames: list[Frame] = []
    pc, bp = g.sched_pc, g.sched_bp
    old_syscall = g.status == "syscall" and proc.build_info.version < (1, 23, 0)
    exact = False
    while True:
        fr = _frame(proc, pc, exact)
        if fr.function == _GOEXIT:
            return Stack(frames, True)
        if len(frames) >= max_frames:
            return Stack(frames, False, "...additional frames elided...")
        frames.append(fr)
        if old_syscall:
            return Stack(frames, False, "in a system call: Go < 1.23 saves no frame pointer")
        if bp == 0 and len(frames) == 1:
            # Never run: the start function at its entry, goexit's return address at sp.
            pair = mem.u64_pair(g.sched_sp)
            if pair is not None and _frame(proc, pair[0] - bias).function == _GOEXIT:
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


def walk_stacks(
    proc: GoProcess, goroutines: list[Goroutine], max_frames: int = MAX_FRAMES
) -> dict[int, Stack]:
    """walk_stack for many goroutines, their stack bytes read in batched system calls.

    Keyed by goid."""
    wanted = [(g, _stack_range(g)) for g in goroutines if g.status != "running"]
    ranges = [rng for _, rng in wanted if rng is not None]
    datas = iter(proc.memory.read_many(ranges))
    out: dict[int, Stack] = {}
    for g, rng in wanted:
        out[g.goid] = walk_stack(proc, g, max_frames, next(datas) if rng else None)
    for g in goroutines:
        if g.goid not in out:
            out[g.goid] = walk_stack(proc, g, max_frames)
    return out
