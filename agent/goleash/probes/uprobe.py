"""Attach BCC uprobes at a file offset we computed, bypassing BCC's own resolution.

BCC's attach_uprobe(addr=...) re-resolves the address (a virtual address for
non-PIE, a load-relative one for PIE) through bcc_resolve_symname, which also
refuses paths like /proc/PID/exe. We already know the file offset from the ELF
program headers (gobin), so we hand it to the kernel directly; the kernel follows
/proc/PID/exe into the process's own mount namespace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def attach_at(bpf: Any, path: str, file_offset: int, fn_name: str, pid: int) -> str:
    """Attach `fn_name` at `file_offset` of `path` for `pid`; returns the event name."""
    from bcc import BPF, lib

    fn = bpf.load_func(fn_name.encode(), BPF.KPROBE)
    ev_name = bpf._get_uprobe_evname(b"p", path.encode(), file_offset, pid)
    fd = lib.bpf_attach_uprobe(fn.fd, 0, ev_name, path.encode(), file_offset, pid)
    if fd < 0:
        raise OSError(f"uprobe at {path}+{file_offset:#x} for PID {pid} was refused by the kernel")
    bpf._add_uprobe_fd(ev_name, fd)
    return ev_name.decode()


def detach(bpf: Any, ev_name: str) -> None:
    """Remove one uprobe attached by attach_at (idempotent)."""
    # Already gone when the process exited or it was detached before.
    with contextlib.suppress(Exception):
        bpf.detach_uprobe_event(ev_name.encode())


@contextlib.contextmanager
def empty_probes(path: str, pid: int, file_offsets: list[int]) -> Iterator[None]:
    """Attach a program that does nothing at each offset: the trap's own cost.

    `make bench` measures goleash's programs as a ratio against this baseline at
    the same sites; it lives here because probes is the only package that imports bcc.
    """
    from bcc import BPF

    b = BPF(text=b"int hit(struct pt_regs *ctx) { return 0; }")
    try:
        for off in file_offsets:
            attach_at(b, path, off, "hit", pid)
        yield
    finally:
        b.cleanup()
