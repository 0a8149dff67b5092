"""What a loaded BPF program costs per run, from the kernel's own accounting.

BPF_ENABLE_STATS (Linux >= 5.8) makes the kernel time every run of every program
while the returned fd is open (like sysctl kernel.bpf_stats_enabled, but undone when
the fd closes, so nothing is left switched on). Each program's fdinfo then shows
run_time_ns and run_cnt. The timing itself adds two clock reads to each run (~70 ns
here), so figures taken with stats on are an upper bound and runs timed from the
outside must not overlap them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator

from goleash.probes.uprobe import _BPF_ATTR_SIZE, bpf_syscall

_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def stats_enabled() -> Iterator[None]:
    """Run-time accounting on for every BPF program while inside."""
    attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
    struct.pack_into("<I", attr, 0, _BPF_STATS_RUN_TIME)
    fd = bpf_syscall(_BPF_ENABLE_STATS, attr)
    try:
        yield
    finally:
        os.close(fd)


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program of this process, by its fd."""
    fields: dict[str, str] = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))
