"""check.bpf.c compiled once, loaded from a cached image after (probes/bpfimage.py).

What a user relies on: a later run loads the cached program and follows processes
exactly as a compiled one does; a cache that is corrupt, made for another kernel or
source, refused by the kernel, or in a directory others can write is never used:
goleash compiles again, says why, and repairs the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bpfcache
from goleash.probes import bpfimage
from goleash.probes.bpfload import Origin
from goleash.probes.testleaks import FOLLOW_EXEC, CheckProbes

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding check.bpf.c's image, compiled once for the module."""
    home = tmp_path_factory.mktemp("xdg")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    try:
        probes = CheckProbes()
        probes.close()
        assert probes.origin.source == "compiled"
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old
    return home


@pytest.fixture
def cache(compiled_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the warm cache: the image file's path."""
    return bpfcache.warm_copy(compiled_cache, tmp_path, monkeypatch, "check")


def _follows_an_exec(probes: CheckProbes) -> None:
    """The loaded program works: a followed process that execs is stopped and reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os.execv("/bin/true", ["/bin/true"])
    os.close(r)
    try:
        probes.follow(pid)
        os.write(w, b"x")
        deadline = time.monotonic() + 10
        seen = []
        while time.monotonic() < deadline and not seen:
            seen = [ev for ev in probes.poll(50) if ev.kind == FOLLOW_EXEC and ev.pid == pid]
        assert seen, "no exec event from the followed process"
    finally:
        os.close(w)
        os.kill(pid, signal.SIGCONT)
        os.waitpid(pid, 0)


def _load() -> CheckProbes:
    probes = CheckProbes()
    try:
        _follows_an_exec(probes)
    except BaseException:
        probes.close()
        raise
    return probes


def test_a_later_run_loads_the_cached_program_and_it_follows_processes(cache: Path) -> None:
    t = time.monotonic()
    probes = _load()
    took = time.monotonic() - t
    probes.close()
    assert probes.origin.source == "cache", probes.origin
    assert took < 5  # a compile here takes 1.5-4.4 s; loading is milliseconds (bench)


def _load_origin() -> Origin:
    probes = _load()
    probes.close()
    return probes.origin


def test_a_corrupt_cache_is_detected_and_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bpfcache.corrupt(cache)
    bpfcache.expect_recompiled(_load_origin, caplog, "checksum mismatch")


def test_a_truncated_cache_is_detected_and_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache.write_bytes(cache.read_bytes()[:100])
    bpfcache.expect_recompiled(_load_origin, caplog, "malformed")


def test_a_cache_made_for_another_kernel_or_source_is_not_used(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bpfcache.make_foreign(cache)
    bpfcache.expect_recompiled(_load_origin, caplog, "compiled for another source, kernel or BCC")


def test_a_cache_the_kernel_refuses_is_recompiled(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = bpfimage.BpfImage.from_json(cache.read_text())
    # Well-formed but not a program the verifier takes: `exit` with r0 never set.
    progs = tuple(dataclasses.replace(p, insns=b"\x95" + b"\0" * 7, relocs=()) for p in image.progs)
    bpfcache.rewrite(cache, progs=progs)
    bpfcache.expect_recompiled(_load_origin, caplog, "the kernel refused the cached program")


def test_a_cache_directory_others_can_write_is_not_trusted(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache.parent.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        probes = _load()
    probes.close()
    assert probes.origin.source == "compiled"
    assert "writable by others" in probes.origin.cache_miss


def test_the_key_changes_with_source_flags_and_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "p.bpf.c"
    src.write_text("int f(void *ctx) { return 0; }\n")
    base = bpfimage.cache_key([src], ["-DX=1"])
    assert bpfimage.cache_key([src], ["-DX=1"]) == base
    assert bpfimage.cache_key([src], ["-DX=2"]) != base
    src.write_text("int f(void *ctx) { return 1; }\n")
    assert bpfimage.cache_key([src], ["-DX=1"]) != base
    src.write_text("int f(void *ctx) { return 0; }\n")
    real = os.uname()
    other = os.uname_result((real.sysname, real.nodename, "0.0.0-other", *real[3:]))
    monkeypatch.setattr(os, "uname", lambda: other)
    assert bpfimage.cache_key([src], ["-DX=1"]) != base


def test_an_image_round_trips_and_bad_relocations_are_refused(cache: Path) -> None:
    image = bpfimage.BpfImage.from_json(cache.read_text())
    assert bpfimage.BpfImage.from_json(image.to_json()) == image
    assert any(p.relocs for p in image.progs)  # map fds are patched at load
    prog = next(p for p in image.progs if p.relocs)
    bad = dataclasses.replace(prog, relocs=((prog.relocs[0][0] + 1, prog.relocs[0][1]),))
    broken = dataclasses.replace(image, progs=(bad,))
    with pytest.raises(bpfimage.ImageError, match="bad relocation"):
        bpfimage.BpfImage.from_json(broken.to_json())
    body = json.loads(json.loads(image.to_json())["body"])
    assert body["format"] == bpfimage.FORMAT


def test_prepare_compiles_once_and_a_check_then_loads_the_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`goleash prepare` (the install step) leaves a program the next check loads
    without compiling; a second prepare finds it and compiles nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cmd = [sys.executable, "-m", "goleash.cli", "prepare"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "compiled and cached" in first.stdout
    assert [p.name[:6] for p in (tmp_path / "goleash" / "bpf").glob("*.json")] == ["check-"]
    assert _load_origin().source == "cache"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already cached" in again.stdout
