"""The agent's goroutines program compiled once per node, loaded from the image cache
after (probes/bpfimage.py, bpfload.py), and never compiled in the agent itself.

What a user relies on: an agent counts a process's goroutines the same whether its
program was just compiled or loaded from the cache; neither maps LLVM or clang (the
compile runs in a child process, a warm start runs no compiler at all), which is
what keeps the agent's memory peak low; a cache that is corrupt, made for another
kernel or source, or refused by the kernel is never used: the agent compiles again,
says why, and repairs the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gobuild
from goleash.probes import bpfimage
from goleash.probes.goroutines import GoroutineProbes, GoroutineProgram
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import running_populations

pytestmark = pytest.mark.root

CHURN = 40
SMALL = {"max_live": 256, "max_sites": 1024}  # a program of its own per test: quick


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the small goroutines program, compiled once."""
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        program = GoroutineProgram(**SMALL)
        program.compile()
        program.close()
    assert program.origin.startswith("compiled"), program.origin
    return home


@pytest.fixture
def cache(compiled_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the warm cache: the image file's path."""
    home = tmp_path / "xdg"
    shutil.copytree(compiled_cache, home)
    (home / "goleash" / "bpf").chmod(0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    [image] = (home / "goleash" / "bpf").glob("goroutines-*.json")
    return image


def _counts_churn(program: GoroutineProgram) -> None:
    """The loaded program works: a churn of CHURN goroutines is counted at its site."""
    with running_populations(gobuild.TOOLCHAINS[-1], "pie") as pop:
        probes = GoroutineProbes(GoProcess.attach(pop.pid), program=program)
        try:
            probes.attach()
            pop.churn(CHURN)
            wait_for(
                lambda: CHURN in [c.created for c in probes.read().sites.values()],
                f"a site with {CHURN} births",
            )
        finally:
            probes.close()
            probes.proc.close()


def _load() -> GoroutineProgram:
    program = GoroutineProgram(**SMALL)
    try:
        program.compile()
        _counts_churn(program)
    except BaseException:
        program.close()
        raise
    program.close()
    return program


# A fresh agent process: what it maps and how much memory it ever held.
_AGENT = textwrap.dedent(
    """
    import json, sys
    from goleash.probes.goroutines import GoroutineProbes, GoroutineProgram
    from goleash.probes.selfcheck import check_bpf
    from goleash.probes.target import GoProcess
    check_bpf()  # the agent's start-up check
    program = GoroutineProgram(max_live=256, max_sites=1024)
    program.compile()
    probes = GoroutineProbes(GoProcess.attach(int(sys.argv[1])), program=program)
    probes.attach()
    print("attached", flush=True)
    sys.stdin.readline()  # the test churns meanwhile
    created = max((c.created for c in probes.read().sites.values()), default=0)
    maps = open("/proc/self/maps").read()
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    probes.close()
    program.close()
    print(json.dumps({
        "origin": program.origin,
        "created": created,
        "compiler_mapped": "libLLVM" in maps or "libclang" in maps,
        "bcc_imported": "bcc" in sys.modules,
        "peak_kb": int(status["VmHWM"].split()[0]),
    }))
    """
)


def _fresh_agent(pid: int, churn: object) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT, str(pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert agent.stdout is not None and agent.stdin is not None
        assert agent.stdout.readline().strip() == "attached"
        churn()  # type: ignore[operator]
        # The hits are counted in the kernel before churn() returns (the fixture
        # answers after its goroutines ran): one read sees them all.
        agent.stdin.write("read\n")
        agent.stdin.flush()
        out, _ = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0
    return dict(json.loads(out))


def test_neither_a_cold_nor_a_warm_agent_maps_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with running_populations(gobuild.TOOLCHAINS[-1], "default") as pop:
        first = _fresh_agent(pop.pid, lambda: pop.churn(CHURN))
        again = _fresh_agent(pop.pid, lambda: pop.churn(CHURN))
    assert str(first["origin"]).startswith("compiled"), first
    assert again["origin"] == "cache", again
    for run in (first, again):
        assert run["created"] == CHURN, run
        assert run["compiler_mapped"] is False, run
        assert run["bcc_imported"] is False, run


def test_a_later_run_loads_the_cached_program_and_it_counts(cache: Path) -> None:
    program = _load()
    assert program.origin == "cache", program.origin


def _expect_recompiled(caplog: pytest.LogCaptureFixture, why: str) -> None:
    with caplog.at_level(logging.WARNING):
        program = _load()
    assert program.origin.startswith("compiled"), program.origin
    assert why in program.origin
    assert why in caplog.text  # said, not silent
    again = _load()  # and repaired
    assert again.origin == "cache", again.origin


def test_a_corrupt_cache_is_detected_and_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = bytearray(cache.read_bytes())
    i = data.index(b"insns") + 20
    data[i] = ord("A") if data[i] != ord("A") else ord("B")
    cache.write_bytes(bytes(data))
    _expect_recompiled(caplog, "checksum mismatch")


def test_a_cache_made_for_another_kernel_or_source_is_not_used(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = bpfimage.BpfImage.from_json(cache.read_text())
    cache.write_text(dataclasses.replace(image, key=image.key[:32] + "0" * 32).to_json())
    _expect_recompiled(caplog, "compiled for another source, kernel or BCC")


def test_a_cache_the_kernel_refuses_is_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = bpfimage.BpfImage.from_json(cache.read_text())
    # Well-formed, but a map the kernel cannot create (an array with a 2-byte key).
    maps = tuple(
        dataclasses.replace(m, key_size=2) if m.name == "gr_modes" else m for m in image.maps
    )
    cache.write_text(dataclasses.replace(image, maps=maps).to_json())
    _expect_recompiled(caplog, "the kernel refused the cached program")


def test_a_cache_whose_maps_disagree_with_the_reader_is_not_used(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A program the kernel takes but whose map has another shape than Python's view
    (another goleash's image under a colliding name) fails with both named, and no
    process is traced with it."""
    image = bpfimage.BpfImage.from_json(cache.read_text())
    maps = tuple(
        dataclasses.replace(m, value_size=16) if m.name == "gr_usage" else m for m in image.maps
    )
    cache.write_text(dataclasses.replace(image, maps=maps).to_json())
    program = GoroutineProgram(**SMALL)
    with pytest.raises(Exception, match="disagree: map gr_usage"):
        program.compile()
    assert not program.compiled
