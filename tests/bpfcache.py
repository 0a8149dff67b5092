"""The BPF image cache (probes/bpfimage.py) as the cache tests tamper with it: one
warm cache per test module, a copy per test, and the ways a cached image goes bad.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from goleash.probes import bpfimage
from goleash.probes.bpfload import Origin


def warm_copy(compiled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """This test's own copy of the warm cache COMPILED (an $XDG_CACHE_HOME, now in
    effect): the path of NAME's image."""
    home = tmp_path / "xdg"
    shutil.copytree(compiled, home)
    (home / "goleash" / "bpf").chmod(0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    [image] = (home / "goleash" / "bpf").glob(f"{name}-*.json")
    return image


def corrupt(image: Path) -> None:
    """One byte of the code changed (the checksum no longer matches)."""
    data = bytearray(image.read_bytes())
    i = data.index(b"insns") + 20
    data[i] = ord("A") if data[i] != ord("A") else ord("B")
    image.write_bytes(bytes(data))


def rewrite(image: Path, **changes: object) -> None:
    """A well-formed image (valid checksum) with some fields changed."""
    old = bpfimage.BpfImage.from_json(image.read_text())
    image.write_text(dataclasses.replace(old, **changes).to_json())  # type: ignore[arg-type]


def make_foreign(image: Path) -> None:
    """Compiled for another key: its file name matches (a 128-bit prefix), not the key."""
    key = bpfimage.BpfImage.from_json(image.read_text()).key
    rewrite(image, key=key[:32] + "0" * 32)


def expect_recompiled(
    load: Callable[[], Origin], caplog: pytest.LogCaptureFixture, why: str
) -> None:
    """LOAD (a program loaded and shown to work; its origin) compiles again, says
    WHY, and repairs the cache: the next LOAD is from it."""
    with caplog.at_level(logging.WARNING):
        origin = load()
    assert origin.source == "compiled", origin
    assert why in origin.cache_miss
    assert why in caplog.text  # said, not silent
    again = load()
    assert again.source == "cache", again
