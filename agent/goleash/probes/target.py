"""A running Go process, with everything read from its binary that tracing it needs.

The binary is opened through /proc/PID/exe, which works for a process in another
mount namespace (a container) and for an executable deleted or replaced on disk
since the process started. Addresses from gobin are link-time: add `load_bias`
(non-zero for PIE) to get the process's own addresses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from goleash.errors import GoleashError, printable
from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo
from goleash.gobin.errors import BinaryError, ProcessError
from goleash.gobin.offsets import RuntimeOffsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.report import InspectReport, inspect_binary
from goleash.gobin.shared import SHARED, Analysis, AnalysisCache
from goleash.gobin.symbols import SymbolTable
from goleash.probes.procmem import ProcessMemory, check_pid, exe_path, load_bias, start_time


@dataclass
class GoProcess:
    pid: int
    exe: str  # /proc/PID/exe: the path to open or attach uprobes to
    exe_name: str  # where the executable lives in its own mount namespace, for people
    binary: GoBinary
    build_info: BuildInfo
    offsets: RuntimeOffsets
    symbols: SymbolTable
    pclntab: Pclntab
    load_bias: int
    memory: ProcessMemory = field(repr=False)
    start_time: int  # /proc/PID/stat starttime: a reused PID has another
    # The analysis shared with other processes of the same file (released on close);
    # None when the caller built this object around a binary of its own.
    shared: Analysis | None = field(default=None, repr=False)
    cache: AnalysisCache | None = field(default=None, repr=False)

    @classmethod
    def attach(cls, pid: int, *, cache: AnalysisCache = SHARED) -> GoProcess:
        """Open PID's Go executable and memory. The executable's analysis comes from
        `cache`: done once per file, shared by every process running it. Raises (each
        with a message to act on): ProcessError (no such PID, exited, no permission),
        NotGoError / NotELFError (not a Go program), UnsupportedGoVersionError,
        OffsetsUnavailableError."""
        check_pid(pid)
        exe = exe_path(pid)
        try:
            exe_name = printable(os.readlink(exe))  # shown to people: no control characters
        except OSError:
            exe_name = exe
        started = start_time(pid)
        try:
            shared = cache.acquire(exe)
        except BinaryError as exc:
            raise _named(exc, pid, exe, exe_name, started) from None
        binary = shared.binary
        try:
            memory = ProcessMemory(pid)
            bias = load_bias(pid, binary)
            if started is None or start_time(pid) != started:
                raise ProcessError(f"PID {pid}: the process exited while attaching")
            if not _runs(pid, binary):
                raise ProcessError(f"PID {pid}: it exec'd another program while attaching")
        except BaseException:
            cache.release(shared)
            raise
        return cls(
            pid=pid,
            exe=exe,
            exe_name=exe_name,
            binary=binary,
            build_info=shared.build_info,
            offsets=shared.offsets,
            symbols=shared.symbols,
            pclntab=shared.pclntab,
            load_bias=bias,
            memory=memory,
            start_time=started,
            shared=shared,
            cache=cache,
        )

    def same_executable(self) -> bool:
        """The same process still runs the very file that was analysed: checked after
        probes are placed, which are removed again when not (an exec, a reused PID)."""
        return self.alive() and _runs(self.pid, self.binary)

    @property
    def go_version(self) -> str:
        return self.build_info.go_version

    def alive(self) -> bool:
        """The same process (not a reused PID) still runs."""
        return start_time(self.pid) == self.start_time

    def runtime_addr(self, link_addr: int) -> int:
        return link_addr + self.load_bias

    def link_addr(self, runtime_addr: int) -> int:
        return runtime_addr - self.load_bias

    def close(self) -> None:
        """Idempotent: the shared analysis is released once, by its last user closed."""
        try:
            self.memory.close()
        finally:
            shared, self.shared = self.shared, None
            if shared is not None and self.cache is not None:
                self.cache.release(shared)
            elif self.cache is None:  # a binary of its own (not from a cache)
                self.binary.close()

    def __enter__(self) -> GoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(pid: int, binary: GoBinary) -> bool:
    """PID's executable is the inode `binary` was read from."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == binary.key[:2]


def _named(
    exc: BinaryError, pid: int, exe: str, exe_name: str, started: int | None
) -> GoleashError:
    """The error for a user: the process named (not /proc/PID/exe), or, when it
    exited or exec'd meanwhile, a ProcessError (transient) instead of a verdict."""
    if start_time(pid) != started:
        return ProcessError(f"PID {pid}: the process exited while attaching")
    msg = printable(str(exc).replace(f"{exe}: ", "", 1))
    return type(exc)(f"PID {pid} ({printable(exe_name)}): {msg}")


def inspect_process(pid: int) -> InspectReport:
    """`goleash inspect --pid`: the binary's report, plus where the process loaded it."""
    with GoProcess.attach(pid) as proc:
        report = inspect_binary(proc.binary)
        report.pid = pid
        report.load_bias = proc.load_bias
        report.path = proc.exe_name
    return report
