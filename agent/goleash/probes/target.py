"""A running Go process, with everything read from its binary that tracing it needs.

The binary is opened through /proc/PID/exe, which works for a process in another
mount namespace (a container) and for an executable deleted or replaced on disk
since the process started. Addresses from gobin are link-time: add `load_bias`
(non-zero for PIE) to get the process's own addresses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo
from goleash.gobin.errors import BinaryError, ProcessError
from goleash.gobin.offsets import RuntimeOffsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.report import InspectReport, analyze, inspect_binary
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

    @classmethod
    def attach(cls, pid: int) -> GoProcess:
        """Open PID's Go executable and memory. Raises (each with a message to act on):
        ProcessError (no such PID, exited, no permission), NotGoError / NotELFError
        (not a Go program), UnsupportedGoVersionError, OffsetsUnavailableError."""
        check_pid(pid)
        exe = exe_path(pid)
        try:
            exe_name = os.readlink(exe)
        except OSError:
            exe_name = exe
        started = start_time(pid)
        try:
            binary = GoBinary(exe)
            info, symbols, offsets, pclntab = analyze(binary)
        except BinaryError as exc:
            if start_time(pid) != started:
                raise ProcessError(f"PID {pid}: the process exited while attaching") from None
            # Name the process, not /proc/PID/exe, in what the user reads.
            msg = str(exc).replace(f"{exe}: ", "", 1)
            raise type(exc)(f"PID {pid} ({exe_name}): {msg}") from None
        memory = ProcessMemory(pid)
        bias = load_bias(pid, binary)
        if started is None or start_time(pid) != started:
            raise ProcessError(f"PID {pid}: the process exited while attaching")
        return cls(
            pid=pid,
            exe=exe,
            exe_name=exe_name,
            binary=binary,
            build_info=info,
            offsets=offsets,
            symbols=symbols,
            pclntab=pclntab,
            load_bias=bias,
            memory=memory,
            start_time=started,
        )

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
        self.memory.close()

    def __enter__(self) -> GoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect_process(pid: int) -> InspectReport:
    """`goleash inspect --pid`: the binary's report, plus where the process loaded it."""
    with GoProcess.attach(pid) as proc:
        report = inspect_binary(proc.binary)
        report.pid = pid
        report.load_bias = proc.load_bias
        report.path = proc.exe_name
    return report
