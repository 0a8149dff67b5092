"""What a uprobe hit costs on this host, measured by the agent (again every 10 minutes:
probes/budget.py).

The overhead budget counts hits times a cost per hit. That cost is mostly the trap
(a VM exit on virtual machines) and varies several-fold between hosts and with
load: `make bench` measured 687 ns emulated / 9,188 ns single-stepped on a quiet CI
VM, 1,400 / 29,000 ns on the same kind of VM with other work running. A governor
fed constants from a quiet day lets its probes cost twice the budget on a busy one.

So the agent measures: a 6-byte function of its own (`push rbp; mov rbp, rsp; mov
rax, rdi; pop rbp; ret`) in a memfd mapped executable, called through ctypes with
an empty BPF program (two instructions, loaded without a compiler) on its `push`
(emulated) and on its `mov` (single-stepped) through a uprobe_multi link, against the
same calls unprobed. Runs are interleaved and the median kept. It costs the agent
~0.1 s of CPU each time; no traced process is touched. A kernel without uprobe_multi
links (before 6.6) keeps the defaults.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import time
from dataclasses import dataclass

from goleash.probes import uprobe

# push rbp; mov rbp, rsp; mov rax, rdi; pop rbp; ret
_CODE = bytes.fromhex("554889e54889f85dc3")
_PUSH_AT, _MOV_AT = 0, 4
_ROUNDS = 3
_CALLS_EMULATED = 3000
_CALLS_STEPPED = 600
# The BPF programs goleash runs add their own work to the trap (map lookups, reads of
# the g): `make bench` measured goleash's hit at 1.2-1.4x an empty one.
PROGRAM_FACTOR = 1.3


class HitCostError(Exception):
    """The host's uprobe hit cost could not be measured here."""


@dataclass(frozen=True)
class HitCosts:
    emulated_ns: float  # an empty program's hit at an emulated instruction
    stepped_ns: float  # at a single-stepped one


def _mapped_function(fd: int) -> tuple[ctypes._CFuncPtr, int]:  # type: ignore[name-defined]
    os.write(fd, _CODE.ljust(mmap.PAGESIZE, b"\xcc"))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    addr = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise HitCostError(f"mapping the calibration code: {os.strerror(ctypes.get_errno())}")
    fn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(addr)
    return fn, addr


def _load_empty_program() -> int:
    """An empty uprobe program for uprobe_multi links (no compiler: a BCC compile
    would cost the agent ~0.5 s of CPU, seconds on a busy host, on its start-up
    path); its fd."""
    try:
        return uprobe.load_empty_program(uprobe._BPF_TRACE_UPROBE_MULTI)
    except OSError as exc:
        raise HitCostError(f"loading an empty BPF program: {exc.strerror}") from None


def _per_call_ns(fn: ctypes._CFuncPtr, n: int) -> float:  # type: ignore[name-defined]
    """CPU time of this thread per call: a trap is charged to the thread that takes
    it, and time spent waiting for a core (a busy host) is not."""
    t0 = time.thread_time_ns()
    for i in range(n):
        fn(i)
    return (time.thread_time_ns() - t0) / n


def measure() -> HitCosts:
    """Measure an empty uprobe hit, emulated and single-stepped, in this process."""
    if os.geteuid() != 0:
        raise HitCostError("measuring uprobe hits needs root")
    fd = os.memfd_create("goleash-hitcost")
    addr = 0
    prog_fd = -1
    try:
        fn, addr = _mapped_function(fd)
        if fn(7) != 7:
            raise HitCostError("the calibration function does not return its argument")
        path, pid = f"/proc/{os.getpid()}/fd/{fd}", os.getpid()
        prog_fd = _load_empty_program()
        samples: dict[str, list[float]] = {"emulated": [], "stepped": []}
        for _ in range(_ROUNDS):
            for kind, off, n in (
                ("emulated", _PUSH_AT, _CALLS_EMULATED),
                ("stepped", _MOV_AT, _CALLS_STEPPED),
            ):
                base = _per_call_ns(fn, n)
                link = uprobe.link_multi(prog_fd, path, [off], pid)
                try:
                    probed = _per_call_ns(fn, n)
                finally:
                    os.close(link)
                samples[kind].append(probed - base)
        emulated = statistics.median(samples["emulated"])
        stepped = statistics.median(samples["stepped"])
        if not (0 < emulated < 1e6 and 0 < stepped < 1e7):
            raise HitCostError(f"implausible hit costs: {emulated:.0f} / {stepped:.0f} ns")
        return HitCosts(emulated, stepped)
    except HitCostError:
        raise
    except Exception as exc:  # BCC raises bare Exception
        raise HitCostError(f"measuring uprobe hits: {exc}") from exc
    finally:
        if prog_fd >= 0:
            os.close(prog_fd)
        if addr:
            libc = ctypes.CDLL(None)
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.munmap(ctypes.c_void_p(addr), mmap.PAGESIZE)
        os.close(fd)
