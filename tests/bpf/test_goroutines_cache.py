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
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bpfcache
import gobuild
from goleash.probes import bpfimage
from goleash.probes.bpfload import Origin
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
    assert program.origin is not None and program.origin.source == "compiled"
    return home


@pytest.fixture
def cache(compiled_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the warm cache: the image file's path."""
    return bpfcache.warm_copy(compiled_cache, tmp_path, monkeypatch, "goroutines")


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


def _load() -> Origin:
    """A program loaded and shown to count; where it came from."""
    program = GoroutineProgram(**SMALL)
    try:
        program.compile()
        _counts_churn(program)
    finally:
        program.close()
    assert program.origin is not None
    return program.origin


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
        "origin": program.origin.source,
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
    assert first["origin"] == "compiled", first
    assert again["origin"] == "cache", again
    for run in (first, again):
        assert run["created"] == CHURN, run
        assert run["compiler_mapped"] is False, run
        assert run["bcc_imported"] is False, run


def test_a_later_run_loads_the_cached_program_and_it_counts(cache: Path) -> None:
    assert _load().source == "cache"


def test_a_corrupt_cache_is_detected_and_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bpfcache.corrupt(cache)
    bpfcache.expect_recompiled(_load, caplog, "checksum mismatch")


def test_a_cache_made_for_another_kernel_or_source_is_not_used(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bpfcache.make_foreign(cache)
    bpfcache.expect_recompiled(_load, caplog, "compiled for another source, kernel or BCC")


def test_a_cache_the_kernel_refuses_is_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found when the program is loaded, before any process is attached with it."""
    image = bpfimage.BpfImage.from_json(cache.read_text())
    # Well-formed, but the exit probe is not a program the verifier takes: `exit` with
    # r0 never set. The churn test never attaches it: only loading at once finds it.
    progs = tuple(
        dataclasses.replace(p, insns=b"\x95" + b"\0" * 7, relocs=()) if p.name == "on_exit" else p
        for p in image.progs
    )
    bpfcache.rewrite(cache, progs=progs)
    bpfcache.expect_recompiled(_load, caplog, "the kernel refused the cached program")


def test_a_cache_with_a_map_the_kernel_cannot_create_is_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = bpfimage.BpfImage.from_json(cache.read_text())
    maps = tuple(  # an array with a 2-byte key
        dataclasses.replace(m, key_size=2) if m.name == "gr_modes" else m for m in image.maps
    )
    bpfcache.rewrite(cache, maps=maps)
    bpfcache.expect_recompiled(_load, caplog, "the kernel refused the cached program")


def test_a_cache_whose_map_sizes_differ_from_the_program_is_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A map smaller than what the program reads from it (another build's image
    under a colliding name): the verifier refuses the program at load, before a
    process is attached with it."""
    image = bpfimage.BpfImage.from_json(cache.read_text())
    maps = tuple(
        dataclasses.replace(m, value_size=16) if m.name == "gr_usage" else m for m in image.maps
    )
    bpfcache.rewrite(cache, maps=maps)
    bpfcache.expect_recompiled(_load, caplog, "the kernel refused the cached program")
