"""The one way goleash attaches uprobes: at a file offset we computed, as perf-event
uprobes or as one uprobe_multi BPF link per group of sites.

BCC's attach_uprobe(addr=...) re-resolves the address (a virtual address for
non-PIE, a load-relative one for PIE) through bcc_resolve_symname, which also
refuses paths like /proc/PID/exe. We already know the file offset from the ELF
program headers (gobin), so we hand it to the kernel directly; the kernel follows
/proc/PID/exe into the process's own mount namespace.

Closing a perf-event uprobe costs the kernel an RCU grace period (~0.1 s here for
each, serialized; ~0.04 s for a whole uprobe_multi link), though the breakpoints
leave the process at once. So probes that come and go (function latency, sampled)
are attached in groups, each group one uprobe_multi link where the kernel has them
(Linux >= 6.6, which BCC 0.26 does not wrap: a raw bpf(2) call), one perf-event
uprobe per site elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from goleash.probes.bpfimage import PROG_TYPE_KPROBE  # uprobes are kprobe-type programs

# bpf(2) for uprobe_multi links (Linux >= 6.6).
_SYS_BPF = 321  # x86-64
_BPF_LINK_CREATE = 28
_BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type
_BPF_ATTR_SIZE = 128
_libc = ctypes.CDLL(None, use_errno=True)

Detach = Callable[[], None]
# perf_reader callbacks: (cookie, data, size) and (cookie, lost count)
PERF_RAW_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
PERF_LOST_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ulonglong)
_libbcc_bpf: Any = None


def libbcc_bpf() -> Any:
    """libbcc_bpf: BCC's attach, detach and perf-buffer functions without its compiler.
    libbcc (what `import bcc` loads) links LLVM and clang: mapping them costs ~64 MB
    of resident memory before anything is compiled, so code that only loads, attaches
    and reads programs uses this library (same functions, same C signatures)."""
    global _libbcc_bpf
    if _libbcc_bpf is None:
        try:
            lib = ctypes.CDLL("libbcc_bpf.so.0", use_errno=True)
        except OSError as exc:
            raise OSError(
                f"BCC's libbcc_bpf is missing ({exc}); install libbpfcc (Debian)"
            ) from None
        vp, cp, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        sigs: dict[str, tuple[list[Any], Any]] = {
            # The 7th argument (uint32 ref_ctr_offset, the USDT semaphore) is declared:
            # BCC 0.26's Python binding passes 6, and the C function then reads stack
            # garbage: the kernel refuses a uprobe_multi link at the same offset
            # (semaphore mismatch), and a garbage offset that lands in the binary's
            # writable data would be incremented in the traced process.
            "bpf_attach_uprobe": (
                [c_int, c_int, cp, cp, ctypes.c_ulonglong, c_int, ctypes.c_uint32],
                c_int,
            ),
            "bpf_detach_uprobe": ([cp], c_int),
            "bpf_attach_tracepoint": ([c_int, cp, cp], c_int),
            "bpf_detach_tracepoint": ([cp, cp], c_int),
            "bpf_close_perf_event_fd": ([c_int], c_int),
            "bpf_open_perf_buffer": (
                [PERF_RAW_CB, PERF_LOST_CB, vp, c_int, c_int, c_int],
                vp,
            ),
            "perf_reader_fd": ([vp], c_int),
            "perf_reader_poll": ([c_int, ctypes.POINTER(vp), c_int], c_int),
            "perf_reader_free": ([vp], None),
        }
        for name, (args, res) in sigs.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
        _libbcc_bpf = lib
    return _libbcc_bpf


def attach_at(bpf: Any, path: str, file_offset: int, fn_name: str, pid: int) -> str:
    """Attach `fn_name` at `file_offset` of `path` for `pid` as one perf-event uprobe;
    returns the event name (for detach())."""
    fn = bpf.load_func(fn_name.encode(), PROG_TYPE_KPROBE)
    ev_name = bpf._get_uprobe_evname(b"p", path.encode(), file_offset, pid)
    fd = libbcc_bpf().bpf_attach_uprobe(fn.fd, 0, ev_name, path.encode(), file_offset, pid, 0)
    if fd < 0:
        raise OSError(f"uprobe at {path}+{file_offset:#x} for PID {pid} was refused by the kernel")
    bpf._add_uprobe_fd(ev_name, fd)
    return ev_name.decode()


def detach(bpf: Any, ev_name: str) -> None:
    """Remove one uprobe attached by attach_at (idempotent)."""
    # Already gone when the process exited or it was detached before.
    with contextlib.suppress(Exception):
        bpf.detach_uprobe_event(ev_name.encode())


def bpf_syscall(cmd: int, attr: ctypes.Array[ctypes.c_uint8]) -> int:
    """bpf(2) with a BPF_ATTR_SIZE attr: its result, or OSError with the errno."""
    ret = int(_libc.syscall(_SYS_BPF, cmd, attr, _BPF_ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


# r0 = 0; exit: a program that does nothing, loaded without a compiler
_EMPTY_PROG = bytes.fromhex("b7000000000000009500000000000000")
_BPF_PROG_LOAD = 5


def load_empty_program(expected_attach_type: int = 0) -> int:
    """A uprobe program that does nothing (for a cost baseline, or to prove that
    this process may load programs); its fd, or OSError with the kernel's errno."""
    insns = ctypes.create_string_buffer(_EMPTY_PROG, len(_EMPTY_PROG))
    license = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
    struct.pack_into(
        "<IIQQ",
        attr,
        0,
        PROG_TYPE_KPROBE,
        len(_EMPTY_PROG) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license),
    )
    struct.pack_into("<I", attr, 68, expected_attach_type)
    return bpf_syscall(_BPF_PROG_LOAD, attr)


def link_multi(prog_fd: int, path: str, file_offsets: Sequence[int], pid: int) -> int:
    """One uprobe_multi link of a loaded program at every offset of PATH for PID; its
    fd. OSError when the kernel refuses (no such links before Linux 6.6)."""
    offsets = (ctypes.c_uint64 * len(file_offsets))(*file_offsets)
    c_path = ctypes.create_string_buffer(path.encode())
    attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
    # union bpf_attr.link_create: prog_fd, target_fd, attach_type, flags, then
    # uprobe_multi: path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid.
    struct.pack_into("<IIII", attr, 0, prog_fd, 0, _BPF_TRACE_UPROBE_MULTI, 0)
    struct.pack_into(
        "<QQQQIII",
        attr,
        16,
        ctypes.addressof(c_path),
        ctypes.addressof(offsets),
        0,
        0,
        len(file_offsets),
        0,
        pid,
    )
    try:
        return bpf_syscall(_BPF_LINK_CREATE, attr)
    except OSError as exc:
        raise OSError(exc.errno, f"uprobe_multi link: {exc.strerror}") from None


def attach_multi(bpf: Any, path: str, file_offsets: Sequence[int], fn_name: str, pid: int) -> int:
    """Attach `fn_name` at every offset as one uprobe_multi link; returns the link's fd
    (closing it detaches every site). OSError when the kernel has no such links."""
    try:
        fn = bpf.load_func(fn_name.encode(), PROG_TYPE_KPROBE, attach_type=_BPF_TRACE_UPROBE_MULTI)
    except Exception as exc:  # BCC raises bare Exception; a kernel before 6.6 refuses
        raise OSError(f"loading {fn_name} for uprobe_multi: {exc}") from exc
    return link_multi(fn.fd, path, file_offsets, pid)


class GroupAttacher:
    """Attaches groups of sites for one BPF object and one process: a uprobe_multi link
    per group while the kernel takes them, else (found at the first group) one
    perf-event uprobe per site. Each attach returns the group's detach."""

    def __init__(self, bpf: Any, path: str, pid: int) -> None:
        self.bpf = bpf
        self.path = path
        self.pid = pid
        self.multi: bool | None = None  # uprobe_multi links work here (None: not tried)

    def attach(self, file_offsets: Sequence[int], fn_name: str) -> Detach:
        if self.multi is not False:
            try:
                fd = attach_multi(self.bpf, self.path, file_offsets, fn_name, self.pid)
                self.multi = True
                return lambda: os.close(fd)
            except OSError:
                if self.multi:
                    raise
                self.multi = False
                # The program was loaded for uprobe_multi: reload it for perf events.
                fn = self.bpf.funcs.pop(fn_name.encode(), None)
                if fn is not None:
                    os.close(fn.fd)
        return attach_perf(self.bpf, self.path, file_offsets, fn_name, self.pid)


def attach_perf(bpf: Any, path: str, file_offsets: Sequence[int], fn: str, pid: int) -> Detach:
    """One perf-event uprobe per site (kernels without uprobe_multi links), all or none;
    returns their detach."""
    events: list[str] = []

    def undo() -> None:
        for ev in events:
            detach(bpf, ev)

    try:
        for off in file_offsets:
            events.append(attach_at(bpf, path, off, fn, pid))
    except Exception:
        undo()
        raise
    return undo


class ProgramLinks:
    """Attaches a loaded program's functions to processes, group by group: one
    uprobe_multi link per group where the kernel has them (Linux >= 6.6), else one
    perf-event uprobe per site. Whether links work is learnt from loading a function
    for them (a kernel without them refuses that load), not from a failed link, which
    may be the process's doing (it exited) and is raised.

    A link is also the cheaper hit for the traced thread: the kernel runs its program
    straight from the uprobe, where a perf-event uprobe first goes through the trace
    event's pid filter and dispatch. On goroutine churn (`make bench`, 2026-11, this
    VM) an empty program's hit at goleash's creation site cost ~0.45-0.75 us less as
    a link than as a perf event, of ~1.5-1.9 us."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.multi: bool | None = None  # links work here (None: not tried yet)
        self._fds: dict[str, int] = {}  # function -> its load for links

    def attach(self, pid: int, path: str, file_offsets: Sequence[int], fn: str) -> Detach:
        prog_fd = self._multi_fd(fn) if self.multi is not False else None
        if prog_fd is not None:
            link = link_multi(prog_fd, path, file_offsets, pid)
            return lambda: os.close(link)
        return attach_perf(self.bpf, path, file_offsets, fn, pid)

    def _multi_fd(self, fn: str) -> int | None:
        """FN loaded for uprobe_multi links: a second load beside the perf-event one
        (neither kind can be attached the other way); None when the kernel refuses."""
        fd = self._fds.get(fn)
        if fd is not None:
            return fd
        name = fn.encode()
        perf = self.bpf.funcs.pop(name, None)  # load_func keeps one load per name
        try:
            fd = self.bpf.load_func(name, PROG_TYPE_KPROBE, attach_type=_BPF_TRACE_UPROBE_MULTI).fd
            self.bpf.funcs.pop(name, None)
        except Exception:  # OSError from bpfload, bare Exception from BCC
            self.multi = False
            return None
        finally:
            if perf is not None:
                self.bpf.funcs[name] = perf
        self.multi = True
        self._fds[fn] = fd
        return fd

    def fds(self) -> dict[str, int]:
        """Each function loaded for links: its program fd."""
        return dict(self._fds)

    def close(self) -> None:
        """The loads for links (links hold their own reference: close them apart)."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


@contextlib.contextmanager
def empty_probes(path: str, pid: int, file_offsets: list[int]) -> Iterator[None]:
    """Attach a program that does nothing at each offset: the trap's own cost.

    `make bench` measures goleash's programs as a ratio against this baseline at
    the same sites, so it is attached the way goleash attaches its goroutine probes
    (ProgramLinks): a uprobe_multi link where the kernel has them, else perf-event
    uprobes. It lives here because probes is the only package that imports bcc.
    """
    try:
        prog_fd = load_empty_program(_BPF_TRACE_UPROBE_MULTI)
    except OSError:  # no uprobe_multi before Linux 6.6
        prog_fd = -1
    if prog_fd >= 0:
        try:
            link = link_multi(prog_fd, path, file_offsets, pid)
            try:
                yield
            finally:
                os.close(link)
        finally:
            os.close(prog_fd)
        return
    from bcc import BPF

    b = BPF(text=b"int hit(struct pt_regs *ctx) { return 0; }")
    try:
        for off in file_offsets:
            attach_at(b, path, off, "hit", pid)
        yield
    finally:
        b.cleanup()
