"""The binary parsers never throw anything but BinaryError, and never hang.

Property-based: Hypothesis mutates real Go binaries (the ELF header, program and
section header tables, build info, pclntab, DWARF) and truncates them, and makes
ELF-looking files from scratch; every input must either be read or refused with a
BinaryError (`goleash inspect` exit 2 with a message), never another exception.
Derandomized and bounded (examples per property, a module timeout for hangs) so the
file runs in well under a minute.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gobuild
from goleash.cli import main
from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import read_build_info
from goleash.gobin.errors import BinaryError
from goleash.gobin.offsets import runtime_offsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.report import inspect_path, symbolize

pytestmark = pytest.mark.timeout(180)

TOOLCHAIN = "1.22.10"
FUZZ = settings(
    max_examples=30,
    deadline=None,  # hangs are the module timeout's; CPU noise is not a failure
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values that break parsers: zero, all ones, huge offsets, sign bits, small garbage.
NASTY = st.one_of(
    st.sampled_from(
        [
            b"\x00" * 8,
            b"\xff" * 8,
            struct.pack("<Q", 1 << 62),
            struct.pack("<Q", 1 << 63),
            struct.pack("<I", 0x7FFFFFFF),
            struct.pack("<I", 0xFFFFFFF0),
            b"\x01",
            b"\x80",
        ]
    ),
    st.binary(min_size=1, max_size=16),
)


def _regions(path: Path) -> dict[str, tuple[int, int]]:
    """(file offset, size) of what to damage, from the intact file."""
    with path.open("rb") as f:
        elf = ELFFile(f)
        h = elf.header
        out = {
            "elf_header": (0, 64),
            "program_headers": (h["e_phoff"], h["e_phentsize"] * h["e_phnum"]),
            "section_headers": (h["e_shoff"], h["e_shentsize"] * h["e_shnum"]),
        }
        for name, key in (
            (".go.buildinfo", "buildinfo"),
            (".gopclntab", "pclntab"),
            (".debug_info", "dwarf"),
            (".debug_abbrev", "dwarf_abbrev"),
        ):
            s = elf.get_section_by_name(name)
            if s is not None:
                out[key] = (s["sh_offset"], s["sh_size"])
        pcln = out["pclntab"]
        out["pclntab_header"] = (pcln[0], 96)
    return out


@functools.cache
def _base(variant: str) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """An intact binary and its regions (a function, not a fixture: Hypothesis would
    print a fixture's megabytes with every failure)."""
    path = gobuild.build("spawner", TOOLCHAIN, variant)
    return path.read_bytes(), _regions(path)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="goleash-fuzz-") as d:
        yield Path(d) / "bin"


def _patched(data: bytes, patches: list[tuple[int, bytes]]) -> bytes:
    buf = bytearray(data)
    for off, chunk in patches:
        buf[off : off + len(chunk)] = chunk[: max(0, len(buf) - off)]
    return bytes(buf)


def _damage(draw: st.DrawFn, variant: str, where: str) -> bytes:
    data, regions = _base(variant)
    start, size = regions[where]
    patches = []
    for _ in range(draw(st.integers(1, 4))):
        off = start + draw(st.integers(0, max(0, size - 1)))
        patches.append((off, draw(NASTY)))
    out = _patched(data, patches)
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return out


def _read_all(path: Path) -> None:
    """Everything the agent and `inspect`/`symbolize` ask of a binary."""
    inspect_path(str(path))
    symbolize(str(path), [0, 0x401000, 0x402345, (1 << 64) - 1])


def _only_binary_errors(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        _read_all(path)
    except BinaryError as exc:
        assert str(exc), "a BinaryError says why"


@st.composite
def damaged_stripped(draw: st.DrawFn) -> bytes:
    where = draw(
        st.sampled_from(
            [
                "elf_header",
                "program_headers",
                "section_headers",
                "buildinfo",
                "pclntab_header",
                "pclntab",
            ]
        )
    )
    return _damage(draw, "stripped", where)


@FUZZ
@given(data=st.data())
def test_damaged_stripped_binaries_are_read_or_refused(data: st.DataObject, scratch: Path) -> None:
    _only_binary_errors(scratch, data.draw(damaged_stripped()))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_truncated_binaries_are_refused(data: st.DataObject, scratch: Path) -> None:
    raw = _base("stripped")[0]
    cut = data.draw(st.one_of(st.integers(0, 4096), st.integers(0, len(raw) - 1)))
    scratch.write_bytes(raw[:cut])
    with pytest.raises(BinaryError):
        _read_all(scratch)


@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_damaged_dwarf_is_read_or_refused(data: st.DataObject, scratch: Path) -> None:
    """DWARF is read for the runtime's struct offsets: damage there must end in the
    table's offsets or a BinaryError, never in pyelftools' own exceptions."""
    where = data.draw(st.sampled_from(["dwarf", "dwarf_abbrev", "section_headers"]))
    scratch.write_bytes(_damage(data.draw, "default", where))
    try:
        with GoBinary(scratch) as b:
            runtime_offsets(b, read_build_info(b).go_version)
            Pclntab.from_binary(b)
    except BinaryError:
        pass


ELF64_HEADER = struct.Struct("<4sBBBBB7sHHIQQQIHHHHHH")


@FUZZ
@given(
    e_type=st.sampled_from([0, 2, 3, 0xFFFF]),
    machine=st.sampled_from([0x3E, 0x03, 0xB7, 0]),
    phoff=st.sampled_from([0, 64, 1 << 40, (1 << 64) - 1]),
    shoff=st.sampled_from([0, 64, 120, 1 << 62, (1 << 64) - 1]),
    phnum=st.integers(0, 0xFFFF),
    shnum=st.integers(0, 0xFFFF),
    shstrndx=st.integers(0, 0xFFFF),
    body=st.binary(max_size=512),
)
def test_hand_made_elf_headers_are_refused(
    scratch: Path,
    e_type: int,
    machine: int,
    phoff: int,
    shoff: int,
    phnum: int,
    shnum: int,
    shstrndx: int,
    body: bytes,
) -> None:
    header = ELF64_HEADER.pack(
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7, e_type, machine, 1, 0x401000,
        phoff, shoff, 0, 64, 56, phnum, 64, shnum, shstrndx,
    )  # fmt: skip
    scratch.write_bytes(header + body)
    with pytest.raises(BinaryError):
        _read_all(scratch)


def test_inspect_refuses_what_is_not_a_go_binary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cases users met: each is exit 2 and one message naming the file."""
    raw = _base("stripped")[0]
    bad_shoff = bytearray(raw)
    struct.pack_into("<Q", bad_shoff, 0x28, 1 << 62)
    elf32 = bytearray(raw[:4096])
    elf32[4] = 1
    cases = {
        "truncated": raw[:3000],
        "bad_shoff": bytes(bad_shoff),
        "elf32": bytes(elf32),
        "empty": b"",
        "script": b"#!/bin/sh\necho hi\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for name in [*cases, "fifo", "."]:
        path = tmp_path / name
        assert main(["inspect", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("goleash inspect: ") and str(path) in err, (name, err)
        assert "Traceback" not in err and err.count("\n") == 1, (name, err)


def test_symbolize_refuses_what_is_not_an_address(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(gobuild.build("spawner", TOOLCHAIN, "stripped"))
    for pc in ("zz", "-1", str(1 << 64)):
        with pytest.raises(SystemExit) as exit_:
            main(["symbolize", path, pc])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "not" in err and "address" in err and err.count("\n") == 1, err
