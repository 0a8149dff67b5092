"""Copies of one executable are one analysis (gobin.shared): a container's overlay
gives the same binary another device and inode, a deployment copies it to a second
path. The bytes decide, never the path, the inode or the Go build ID."""

from __future__ import annotations

import shutil
from pathlib import Path

import gobuild
from goleash.gobin.buildinfo import read_build_info
from goleash.gobin.disasm import goroutine_probe_sites
from goleash.gobin.shared import AnalysisCache


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(0o755)
    return dst


def test_two_copies_at_different_paths_are_analysed_once(tmp_path: Path) -> None:
    for variant in ("default", "stripped"):
        built = gobuild.build("spawner", gobuild.TOOLCHAINS[-1], variant)
        a, b = _copy(built, tmp_path / f"a-{variant}"), _copy(built, tmp_path / f"b-{variant}")
        cache = AnalysisCache()
        first, second = cache.acquire(a), cache.acquire(b)
        try:
            assert cache.analyses == 1 and cache.copies_shared == 1
            assert first.key != second.key  # two inodes, each open on its own
            assert first.binary is not second.binary
            assert second.offsets is first.offsets and second.build_info is first.build_info
            # Each copy reads function names from its own mapping.
            assert second.pclntab is not first.pclntab
            assert second.symbols.lookup("runtime.goexit1") == first.symbols.lookup(
                "runtime.goexit1"
            )
            # Disassembled once for both: the same sites object at the same offsets.
            s1 = goroutine_probe_sites(first.binary, first.symbols.lookup)
            s2 = goroutine_probe_sites(second.binary, second.symbols.lookup)
            assert s2 is s1
        finally:
            cache.release(first)
            cache.release(second)
        assert len(cache) == 0


def test_same_build_id_different_bytes_is_analysed_again(tmp_path: Path) -> None:
    # A build ID can be set to anything (-buildid=); only identical bytes share.
    built = gobuild.build("spawner", gobuild.TOOLCHAINS[-1], "default")
    a = _copy(built, tmp_path / "a")
    b = _copy(built, tmp_path / "b")
    with b.open("ab") as f:
        f.write(b"\0")  # past every section: still the same program and build ID
    cache = AnalysisCache()
    first, second = cache.acquire(a), cache.acquire(b)
    try:
        assert read_build_info(first.binary).go_version == read_build_info(second.binary).go_version
        assert cache.analyses == 2 and cache.copies_shared == 0
        assert second.offsets is not first.offsets
        assert goroutine_probe_sites(second.binary, second.symbols.lookup) is not (
            goroutine_probe_sites(first.binary, first.symbols.lookup)
        )
    finally:
        cache.release(first)
        cache.release(second)


def test_a_copy_outlives_the_first_file(tmp_path: Path) -> None:
    built = gobuild.build("spawner", gobuild.TOOLCHAINS[0], "pie")
    a, b = _copy(built, tmp_path / "a"), _copy(built, tmp_path / "b")
    cache = AnalysisCache()
    first = cache.acquire(a)
    second = cache.acquire(b)
    cache.release(first)
    assert first.binary.fd == -1
    a.write_bytes(b"\0" * 64)  # the first file rewritten in place
    try:
        f = second.pclntab.func_by_name("runtime.goexit1")
        assert f is not None and second.pclntab.func_for_pc(f.entry) == f
    finally:
        cache.release(second)
