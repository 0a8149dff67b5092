"""Reading another process's memory without stopping it.

`process_vm_readv(2)` copies from the target's address space in one system call per
batch of up to 1024 ranges; `/proc/PID/mem` is the fallback where that call is not
allowed (seccomp profiles of some container runtimes). Both need the same
permission as ptrace-attaching (root, or CAP_SYS_PTRACE; Yama's ptrace_scope).

The target keeps running while we read: a range can change or be unmapped under us.
Reads of memory that is not mapped (anymore) raise `MemoryFault`, and `read_many`
reports them per range as None, so a caller walking runtime structures can count a
torn read and go on.
"""

from __future__ import annotations

import ctypes
import errno
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import ProcessError

_IOV_MAX = 1024  # Linux UIO_MAXIOV: the most ranges one process_vm_readv takes


class MemoryFault(ProcessError):
    """An address of a live process that is not mapped, or not readable."""


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _libc_readv() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    fn.restype = ctypes.c_ssize_t
    return fn


_process_vm_readv = _libc_readv()


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ("R", "S", "Z", ...), None if there is no PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # The command name is in parentheses and may itself hold ") ": split at the last.
    return stat.rpartition(")")[2].split()[0]


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): tells a reused PID apart.
    Asked for every followed process every interval: read with os.read (a quarter of
    Path.read_text's cost); the command name in it may be any bytes."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    try:
        return int(stat.rpartition(")")[2].split()[19])
    except (IndexError, ValueError):
        return None


def _gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z", "X")


def check_pid(pid: int) -> None:
    """ProcessError unless PID is a live process (not a zombie)."""
    if pid <= 0:
        raise ProcessError(f"PID {pid}: not a process id")
    state = process_state(pid)
    if state is None:
        raise ProcessError(f"PID {pid}: no such process")
    if state in ("Z", "X"):
        raise ProcessError(f"PID {pid}: the process has exited (zombie, not reaped yet)")


class ProcessMemory:
    """The address space of one running process, read as bytes by virtual address."""

    def __init__(self, pid: int, *, use_process_vm_readv: bool = True) -> None:
        """use_process_vm_readv=False reads through /proc/PID/mem only (the fallback,
        chosen by itself when the system call is filtered)."""
        self._mem_fd: int | None = None  # first: close() and __del__ run after any failure
        check_pid(pid)
        self.pid = pid
        self._use_readv = use_process_vm_readv and _process_vm_readv is not None
        # Fail now, not at the first read, when we may not read this process at all.
        self._check_permission()

    def _check_permission(self) -> None:
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        except FileNotFoundError:
            raise ProcessError(f"PID {self.pid}: no such process") from None
        except PermissionError:
            raise ProcessError(
                f"PID {self.pid}: permission denied reading its memory; run goleash as root "
                "(or with CAP_SYS_PTRACE), and check /proc/sys/kernel/yama/ptrace_scope"
            ) from None
        self._mem_fd = fd

    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- errors ---------------------------------------------------------------------

    def _exited(self) -> ProcessError:
        return ProcessError(f"PID {self.pid}: the process exited while goleash was reading it")

    def _failed(self, err: int, addr: int, size: int) -> ProcessError:
        if _gone(self.pid) or err == errno.ESRCH:
            return self._exited()
        if err == errno.EPERM or err == errno.EACCES:
            return ProcessError(
                f"PID {self.pid}: permission denied reading its memory; run goleash as root "
                "(or with CAP_SYS_PTRACE), and check /proc/sys/kernel/yama/ptrace_scope"
            )
        return MemoryFault(
            f"PID {self.pid}: cannot read {size} bytes at {addr:#x} ({os.strerror(err)})"
        )

    # --- reads ------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        """Exactly `size` bytes at `addr`; MemoryFault if unmapped, ProcessError if gone."""
        out = self.read_many([(addr, size)])[0]
        if out is None:
            raise self._failed(errno.EFAULT, addr, size)
        return out

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Each (addr, size) range's bytes, or None where that range is not readable.

        One system call reads up to 1024 ranges. ProcessError if the process is gone.
        """
        out: list[bytes | None] = [None] * len(ranges)
        i = 0
        while i < len(ranges):
            if self._use_readv:
                i = self._readv_from(ranges, i, out)
            else:
                addr, size = ranges[i]
                out[i] = self._pread(addr, size)
                i += 1
        return out

    def _readv_from(
        self, ranges: Sequence[tuple[int, int]], start: int, out: list[bytes | None]
    ) -> int:
        """Read ranges[start:start+1024] in one call; returns the next index to read.

        process_vm_readv stops at the first range it cannot read fully and returns the
        bytes copied so far, so the ranges before it are complete; the failing one is
        None and the next call resumes after it.
        """
        batch = ranges[start : start + _IOV_MAX]
        n = len(batch)
        total = sum(size for _, size in batch)
        buf = ctypes.create_string_buffer(total)
        local = _IOVec(ctypes.addressof(buf), total)
        remote = array("Q")
        for addr, size in batch:
            remote.append(addr)
            remote.append(size)
        raddr, _ = remote.buffer_info()
        assert _process_vm_readv is not None
        got = _process_vm_readv(self.pid, ctypes.byref(local), 1, raddr, n, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM) and not _gone(self.pid):
                # Filtered by seccomp, or a ptrace check that /proc/PID/mem passes.
                self._use_readv = False
                return start
            if err == errno.EFAULT:  # the very first range is unreadable
                if _gone(self.pid):
                    raise self._exited()
                return start + 1
            raise self._failed(err, batch[0][0], batch[0][1])
        if got == 0 and total > 0 and _gone(self.pid):
            raise self._exited()
        raw = buf.raw
        pos = 0
        for k, (_, size) in enumerate(batch):
            if pos + size > got:
                # Range k is the partial or failed one: leave it None, go on after it.
                if _gone(self.pid):
                    raise self._exited()
                return start + k + 1
            out[start + k] = raw[pos : pos + size]
            pos += size
        return start + n

    def _pread(self, addr: int, size: int) -> bytes | None:
        if self._mem_fd is None:
            self._check_permission()
        assert self._mem_fd is not None
        try:
            data = os.pread(self._mem_fd, size, addr)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT) and not _gone(self.pid):
                return None
            raise self._failed(exc.errno or errno.EIO, addr, size) from None
        if len(data) < size:
            if _gone(self.pid):
                raise self._exited()
            return None
        return data


# --- where the executable is mapped ---------------------------------------------------


def exe_path(pid: int) -> str:
    """/proc/PID/exe: opens the process's executable even from another mount namespace."""
    check_pid(pid)
    path = f"/proc/{pid}/exe"
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ProcessError(
            f"PID {pid}: has no executable (a kernel thread, or it just exited)"
        ) from None
    except PermissionError:
        raise ProcessError(
            f"PID {pid}: permission denied opening its executable; run goleash as root"
        ) from None
    return path


def load_bias(pid: int, binary: GoBinary) -> int:
    """What to add to a link-time address of `binary` to get PID's runtime address.

    0 for a position-dependent executable. For a PIE, from /proc/PID/maps: the
    mapping of the executable's file (matched by device and inode, so a path seen
    through another mount namespace still matches) that holds its first PT_LOAD.
    """
    if not binary.is_pie:
        return 0
    try:
        # The inode analysed (held open by `binary`), not whatever PID runs now.
        ino = binary.key[1]
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        maps = Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:
        raise ProcessError(f"PID {pid}: no such process") from None
    except PermissionError:
        raise ProcessError(f"PID {pid}: permission denied reading /proc/{pid}/maps") from None
    first = min(binary.segments, key=lambda s: s.offset)
    page = ~0xFFF
    want_off = first.offset & page
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or int(parts[2], 16) != want_off:
            continue
        path = parts[5].removesuffix(" (deleted)") if len(parts) > 5 else ""
        # The inode identifies the file in any mount namespace; the path is a fallback
        # for filesystems (overlay) whose maps entry shows another inode than stat.
        if int(parts[4]) == ino or path == exe:
            start = int(parts[0].split("-")[0], 16)
            return start - (first.vaddr & page)
    raise ProcessError(f"PID {pid}: cannot find where its executable is mapped in /proc/{pid}/maps")
