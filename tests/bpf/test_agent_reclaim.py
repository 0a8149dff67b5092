"""An exited process's executable is given back by the agent soon after the exit, not
whenever CPython's cyclic collector gets to it (node/reclaim.py): its analysis's ELF
and DWARF objects, and with them the file's mapping and descriptor, sit in reference
cycles. The interpreter's own full collections are switched off here, as they are in
effect on a churning host (they wait for the long-lived objects to grow by a
quarter), so only the agent's reclaiming can free them."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import gobuild
from goleash.node.agent import Agent
from goleash.node.agentconfig import AgentConfig
from goleash.node.discovery import Selector
from polling import wait_for

pytestmark = pytest.mark.root


def _opened(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return n


def _mapped(path: Path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(str(path)) for line in maps)


@contextlib.contextmanager
def _no_automatic_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _running(agent: Agent) -> Iterator[None]:
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    loop.start()
    try:
        yield
    finally:
        stop.set()
        loop.join(timeout=30)
        assert not loop.is_alive()


def test_an_exited_processs_executable_is_unmapped_and_closed_soon(tmp_path: Path) -> None:
    # Copies of our own: their mappings and descriptors are this test's alone.
    exes = []
    for i, toolchain in enumerate((gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1])):
        exes.append(tmp_path / f"glr-reclaim-{i}")
        shutil.copy(gobuild.build("shortlived", toolchain, "default"), exes[-1])
    agent = Agent(
        AgentConfig(
            server="127.0.0.1:9",  # never reached: batches stay in the buffer
            selector=Selector(exe_globs=("glr-reclaim-*",)),
            interval=0.5,
            scan_interval=0.1,
            health_listen=None,
            metrics_listen=None,
        )
    )
    with _no_automatic_gc(), _running(agent):
        for exe in exes:  # two: an analysis made while another one's garbage waits
            proc = subprocess.Popen([str(exe), "live", "3000", "5"])
            try:
                wait_for(lambda p=proc: p.pid in agent.followed, f"PID {proc.pid} followed", 30)
                assert _mapped(exe) and _opened(exe), "followed from its analysed file"
            finally:
                proc.kill()
                proc.wait()
            wait_for(lambda p=proc: p.pid not in agent.followed, "the exit seen", 30)
            wait_for(
                lambda e=exe: (_mapped(e), _opened(e)) == (0, 0),
                f"{exe.name} unmapped and closed after its process exited",
                10,
            )
    assert agent.reclaimer.collections >= 2
