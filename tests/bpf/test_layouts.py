"""The Python views of the BPF structs agree with bpf/goleash.h, as clang lays it out.

goleash.h is written once in C; Python reads and writes the same bytes through views
written by hand (ctypes classes, struct formats, tuples of field and counter names).
Here BCC compiles the header (with the clang it compiles every program with): one map
per struct, whose ctypes types BCC derives from clang's layout, and `_Static_assert`s
generated from the Python side for sizes, enum indexes and constants. A field or a
counter added, removed or moved on one side only fails one of these tests.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

import pytest

from goleash.probes import funcprog, goroutine_maps, goroutines, testleaks
from goleash.probes.bpfsrc import bpf_dir

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Field:
    name: str  # dotted for nested structs; "" where the view has no names
    offset: int
    size: int  # of the whole field (an array: all its elements)
    signed: bool


def _signed(typ: Any) -> bool:
    return issubclass(typ, ctypes._SimpleCData) and typ(-1).value == -1  # type: ignore[attr-defined]


def ctypes_fields(cls: Any, base: int = 0, prefix: str = "") -> list[Field]:
    """Every scalar (or array) field of a ctypes struct, nested structs flattened."""
    out: list[Field] = []
    for name, typ, *_ in cls._fields_:
        off = base + getattr(cls, name).offset
        if issubclass(typ, ctypes.Structure):
            out += ctypes_fields(typ, off, f"{prefix}{name}.")
        else:
            elem = getattr(typ, "_type_", typ) if issubclass(typ, ctypes.Array) else typ
            out.append(Field(prefix + name, off, ctypes.sizeof(typ), _signed(elem)))
    return out


def format_fields(fmt: struct.Struct) -> list[Field]:
    """The fields of a little-endian, unpadded struct format, unnamed."""
    assert fmt.format[0] == "<", "views of BPF structs spell out their padding"
    out, off = [], 0
    for code in fmt.format[1:]:
        size = struct.calcsize("<" + code)
        out.append(Field("", off, size, code.islower()))
        off += size
    return out


def unnamed(fields: list[Field]) -> list[Field]:
    return [Field("", f.offset, f.size, f.signed) for f in fields]


# (struct in goleash.h, its Python view): ctypes classes and struct formats.
VIEWS: list[tuple[str, Any]] = [
    ("goroutine_key", goroutines._GoroutineKey),
    ("goroutine_key", testleaks._Key),
    ("site_key", goroutines._SiteKey),
    ("live_slot", goroutines._LIVE_SLOT),
    ("fl_ctl", funcprog.CtlView),
    ("fl_config", funcprog.ConfigView),
    ("fl_site", funcprog.SiteView),
    ("fl_stats", funcprog.StatsView),
    ("fl_panic_key", funcprog.PanicKeyView),
    ("fl_frame", funcprog.FrameView),
    ("fl_inflight", funcprog.InflightView),
    ("goroutine_key", funcprog.GoroutineKeyView),
    ("goroutine_info", goroutine_maps._GoroutineInfo),
    ("live_slot", goroutine_maps._LiveSlot),
    ("gr_pid_slot", goroutine_maps._PidSlot),
    ("gr_proc", goroutine_maps._Proc),
    ("gr_usage", goroutine_maps._Usage),
    ("site_stats", goroutine_maps._SiteStats),
    ("site_cache_entry", goroutine_maps._SiteCacheEntry),
]
# Structs Python reads through BCC's own Leaf type, by these names (all of them).
NAMED: list[tuple[str, tuple[str, ...]]] = [("fl_stats", funcprog.STAT_FIELDS)]
STRUCTS = sorted({c for c, _ in VIEWS} | {c for c, _ in NAMED})

# enum in goleash.h: C prefix, its count member, Python's names by index, and the
# Python names whose C spelling differs.
ENUMS: list[tuple[str, str, tuple[str, ...], dict[str, str]]] = [
    ("FL_CNT_", "FL_CNT_MAX", funcprog.COUNTER_NAMES, {}),
    (
        "GR_CNT_",
        "GR_CNT_MAX",
        goroutines.COUNTER_NAMES,
        {"live_table_full": "LIVE_FULL", "site_table_full": "SITES_FULL"},
    ),
]
CONSTANTS: list[tuple[str, int]] = [
    ("LIFETIME_SLOTS", goroutines.LIFETIME_SLOTS),
    ("LIVE_SLOT_WRITING", goroutines._SLOT_WRITING),
]


def _compile(body: str) -> Any:
    from bcc import BPF

    d = bpf_dir()
    return BPF(text=f'#include "goleash.h"\n{body}'.encode(), cflags=[f"-I{d}"])


@pytest.fixture(scope="module")
def c_layouts() -> dict[str, Any]:
    """Each struct as BCC built it from clang's layout (the map leaf's ctypes type)."""
    b = _compile("".join(f"BPF_ARRAY(layout_{n}, struct {n}, 1);\n" for n in STRUCTS))
    try:
        leaves = {n: b[f"layout_{n}"].Leaf for n in STRUCTS}
    finally:
        b.cleanup()
    # The ctypes types are BCC's reading of clang's layout: hold them to clang's size.
    asserts = "".join(
        f"_Static_assert(sizeof(struct {n}) == {ctypes.sizeof(leaf)}, "
        f'"struct {n}: BCC\'s ctypes view differs from clang");\n'
        for n, leaf in leaves.items()
    )
    _compile(asserts).cleanup()
    return leaves


@pytest.mark.parametrize(
    ("c_struct", "view"),
    VIEWS,
    ids=[f"{c}-{getattr(v, '__name__', 'format')}" for c, v in VIEWS],
)
def test_python_view_matches_the_header(
    c_layouts: dict[str, Any], c_struct: str, view: Any
) -> None:
    c = ctypes_fields(c_layouts[c_struct])
    if isinstance(view, struct.Struct):
        assert format_fields(view) == unnamed(c), f"{view.format!r} is not struct {c_struct}"
        assert view.size == ctypes.sizeof(c_layouts[c_struct])
    else:
        assert ctypes_fields(view) == c, f"{view.__name__} is not struct {c_struct}"
        assert ctypes.sizeof(view) == ctypes.sizeof(c_layouts[c_struct])


@pytest.mark.parametrize(("c_struct", "names"), NAMED, ids=[c for c, _ in NAMED])
def test_field_names_match_the_header(
    c_layouts: dict[str, Any], c_struct: str, names: tuple[str, ...]
) -> None:
    assert tuple(f.name for f in ctypes_fields(c_layouts[c_struct])) == names


def _static_asserts(checks: list[tuple[str, str]], capfd: pytest.CaptureFixture[str]) -> None:
    """Compile `_Static_assert(expr)` for each (expr, what) with goleash.h; fail with
    clang's messages (BCC prints them, then raises a bare Exception)."""
    body = "".join(f'_Static_assert({expr}, "{what}");\n' for expr, what in checks)
    try:
        _compile(body).cleanup()
    except Exception:
        err = capfd.readouterr().err
        pytest.fail("goleash.h disagrees with Python:\n" + err, pytrace=False)


@pytest.mark.parametrize("enum", ENUMS, ids=[e[0].rstrip("_") for e in ENUMS])
def test_counter_names_match_the_enum(
    enum: tuple[str, str, tuple[str, ...], dict[str, str]], capfd: pytest.CaptureFixture[str]
) -> None:
    prefix, count, names, spelled = enum
    checks = [(f"{count} == {len(names)}", f"{count} is not {len(names)} Python names")]
    checks += [
        (f"{prefix}{spelled.get(n, n.upper())} == {i}", f"Python's counter {i} is {n}")
        for i, n in enumerate(names)
    ]
    _static_asserts(checks, capfd)


def test_constants_match_the_header(capfd: pytest.CaptureFixture[str]) -> None:
    _static_asserts(
        [(f"{name} == {value}ULL", f"Python's {name} is {value}") for name, value in CONSTANTS],
        capfd,
    )
