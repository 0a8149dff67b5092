"""A followed process's exit is seen through its pidfd (one poll for all), not by
reading /proc/PID/stat every scan; an exit, and an exec, are still seen."""

from __future__ import annotations

import os
import subprocess

import pytest

import gobuild
from goleash.node import discovery
from goleash.node.discovery import Discovery, Selector


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd_open")
def test_followed_exit_seen_without_reading_its_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    exe = gobuild.build("populations", gobuild.TOOLCHAINS[-1])
    with subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout is not None
            p.stdout.readline()  # ready
            d = Discovery(Selector(pids=frozenset({p.pid})))
            (c,) = d.scan().appeared
            assert c.pid == p.pid and p.pid in d._pidfds

            reads: list[int] = []
            real = discovery._stat_fields
            monkeypatch.setattr(
                discovery, "_stat_fields", lambda pid, root: reads.append(pid) or real(pid, root)
            )
            for _ in range(3):
                assert d.scan().vanished == []
            assert reads == [], "a followed process's stat was read at every scan"

            p.kill()
            p.wait()
            assert d.scan().vanished == [c.key]
            assert d._pidfds == {} and d.followed == {}
        finally:
            if p.poll() is None:
                p.kill()
            d.close()
