"""The probes of `goleash check` are removed when it ends, without making it wait.

Closing an attached tracepoint or uprobe link waits for the kernel (grace periods,
~0.05-0.2 s each batch here), and a process cannot exit while it waits; a helper
process takes that wait (probes/bpfload.ReleaseHelper). What a user relies on: once
closed, the programs really leave the kernel, and nothing of goleash stays behind.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

import polling
from goleash.probes.bpfload import ReleaseHelper
from goleash.probes.testleaks import CheckProbes

pytestmark = pytest.mark.root

_libc = ctypes.CDLL(None, use_errno=True)
_OBJ_GET_INFO_BY_FD, _PROG_GET_FD_BY_ID = 15, 13


def _prog_id(fd: int) -> int:
    info = (ctypes.c_uint8 * 256)()
    attr = (ctypes.c_uint8 * 128)()
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    assert _libc.syscall(321, _OBJ_GET_INFO_BY_FD, attr, 128) == 0
    return struct.unpack_from("<I", info, 4)[0]


def _prog_exists(prog_id: int) -> bool:
    attr = (ctypes.c_uint8 * 128)()
    struct.pack_into("<I", attr, 0, prog_id)
    fd = _libc.syscall(321, _PROG_GET_FD_BY_ID, attr, 128)
    if fd >= 0:
        os.close(fd)
        return True
    return False


def _children() -> set[int]:
    out = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        text = Path(f"/proc/{os.getpid()}/task/{task}/children").read_text()
        out |= {int(c) for c in text.split()}
    return out


@pytest.mark.parametrize("with_helper", [True, False], ids=["helper", "no-helper"])
def test_closed_probes_leave_the_kernel(with_helper: bool) -> None:
    before = _children()
    helper = ReleaseHelper.start() if with_helper else None
    assert _children() == before  # the helper is nobody's child to reap
    probes = CheckProbes()
    ids = [_prog_id(fn.fd) for fn in probes._bpf.funcs.values()]
    assert ids and all(_prog_exists(i) for i in ids)
    probes.close(helper)
    polling.wait_for(lambda: not any(_prog_exists(i) for i in ids), "the programs gone", timeout=10)
