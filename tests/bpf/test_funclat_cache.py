"""The function-latency and panic program compiled once per node, loaded from the
image cache after (probes/bpfimage.py, bpfload.py), and never compiled in the agent.

What a user relies on: `--func` and `--panics` count a process's calls and panics
the same whether funclat.bpf.c was just compiled or loaded from the cache; neither
a cold nor a warm agent imports BCC or maps LLVM/clang (the compile runs in a child
process, once); a cache that is corrupt or refused by the kernel is never used: the
program is compiled again, the reason said, and the cache repaired.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import bpfcache
import gobuild
from goleash.probes import bpfimage, funcprog
from goleash.probes.bpfload import Origin
from goleash.probes.budget import OverheadBudget
from goleash.probes.funclat import FuncLatencyProbes
from goleash.probes.funcs import FunctionIndex, resolve
from goleash.probes.panics import PanicProbes
from goleash.probes.target import GoProcess

pytestmark = pytest.mark.root

# The fixture's panics mode: GOROUTINES x CALLS calls of main.safeCall, a recovered
# panic in some of them and in every tenth call of main.safeIndex.
GOROUTINES, CALLS = 2, 30
FUNCS = ["main.safeCall", "main.safeIndex"]


@contextmanager
def _fixture(variant: str = "default") -> Iterator[tuple[subprocess.Popen[str], int]]:
    binary = gobuild.build("funclat", gobuild.TOOLCHAINS[-1], variant)
    argv = [str(binary), "-mode", "panics", "-goroutines", str(GOROUTINES), "-calls", str(CALLS)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        ready = p.stdout.readline().split()
        assert ready[0] == "ready", ready
        yield p, int(ready[1])
    finally:
        p.kill()
        p.wait()


def _run(p: subprocess.Popen[str]) -> dict[str, object]:
    """One round of the fixture's calls; its own account of them."""
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    res = json.loads(p.stdout.readline())
    assert p.stdout.readline().strip() == "done"
    return dict(res)


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding funclat.bpf.c's image, compiled once."""
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        bpf, origin = funcprog.load_program(1, 1, 16, 1)
        bpf.cleanup()
    assert origin.source == "compiled", origin
    return home


@pytest.fixture
def cache(compiled_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the warm cache: the image file's path."""
    return bpfcache.warm_copy(compiled_cache, tmp_path, monkeypatch, "funclat")


def _load() -> Origin:
    """Function and panic probes attached from the image and shown to count exactly;
    where the latency program came from."""
    with _fixture() as (p, pid):
        proc = GoProcess.attach(pid)
        sel = resolve(FunctionIndex(proc.binary, proc.pclntab, proc.symbols), FUNCS)
        lat = FuncLatencyProbes(
            proc, sel.functions, budget=OverheadBudget(cpu_fraction=float("inf"))
        )
        panics = PanicProbes(proc)
        try:
            lat.attach()
            panics.attach()
            res = _run(p)
            got = {f.symbol: f.count for f in lat.flush().functions}
            assert got["main.safeCall"] == res["calls"] == GOROUTINES * CALLS, got
            extra = res["extra"]
            assert isinstance(extra, dict)
            assert panics.read().total == extra["recovered"] + extra["index_recovered"]
            origins = [x.origin for x in (lat._prog, panics._prog) if x is not None]
            # Each loads the image (the panic probes verify their own program): one
            # that had to compile is the news.
            return next((o for o in origins if o.source == "compiled"), origins[0])
        finally:
            panics.close()
            lat.close()
            proc.close()


# A fresh agent process following the fixture with --func and --panics: what it maps.
_AGENT = textwrap.dedent(
    """
    import json, math, sys
    from goleash.probes.budget import OverheadBudget
    from goleash.probes.funclat import FuncLatencyProbes
    from goleash.probes.funcs import FunctionIndex, resolve
    from goleash.probes.panics import PanicProbes
    from goleash.probes.selfcheck import check_bpf
    from goleash.probes.target import GoProcess
    check_bpf()  # the agent's start-up check
    proc = GoProcess.attach(int(sys.argv[1]))
    sel = resolve(FunctionIndex(proc.binary, proc.pclntab, proc.symbols), sys.argv[2:])
    lat = FuncLatencyProbes(proc, sel.functions, budget=OverheadBudget(cpu_fraction=math.inf))
    panics = PanicProbes(proc)
    lat.attach()
    panics.attach()
    print("attached", flush=True)
    sys.stdin.readline()  # the test runs the fixture meanwhile
    calls = {f.symbol: f.count for f in lat.flush().functions}
    total = panics.read().total
    origin = lat._prog.origin.source
    maps = open("/proc/self/maps").read()
    panics.close()
    lat.close()
    print(json.dumps({
        "origin": origin,
        "calls": calls,
        "panics": total,
        "compiler_mapped": "libLLVM" in maps or "libclang" in maps,
        "bcc_imported": "bcc" in sys.modules,
    }))
    """
)


def _fresh_agent(p: subprocess.Popen[str], pid: int) -> tuple[dict[str, object], dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT, str(pid), *FUNCS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert agent.stdout is not None and agent.stdin is not None
        assert agent.stdout.readline().strip() == "attached"
        res = _run(p)
        agent.stdin.write("read\n")
        agent.stdin.flush()
        out, _ = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0
    return dict(json.loads(out)), res


def test_neither_a_cold_nor_a_warm_agent_with_func_maps_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with _fixture("pie") as (p, pid):
        first = _fresh_agent(p, pid)
        again = _fresh_agent(p, pid)
    assert first[0]["origin"] == "compiled", first
    assert again[0]["origin"] == "cache", again
    for run, res in (first, again):
        assert run["calls"] == {"main.safeCall": res["calls"], "main.safeIndex": res["calls"] // 10}  # type: ignore[operator]
        extra = res["extra"]
        assert isinstance(extra, dict)
        assert run["panics"] == extra["recovered"] + extra["index_recovered"], (run, res)
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


@pytest.mark.parametrize("refused", ["fl_entry", "fl_ret", "fl_panic"])
def test_a_cache_the_kernel_refuses_is_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    """Found when a process's program is loaded, before its probes are attached
    (which load the programs again, for uprobe_multi links)."""
    image = bpfimage.BpfImage.from_json(cache.read_text())
    progs = tuple(  # `exit` with r0 never set: the verifier refuses it
        dataclasses.replace(p, insns=b"\x95" + b"\0" * 7, relocs=()) if p.name == refused else p
        for p in image.progs
    )
    bpfcache.rewrite(cache, progs=progs)
    bpfcache.expect_recompiled(_load, caplog, "the kernel refused the cached program")
