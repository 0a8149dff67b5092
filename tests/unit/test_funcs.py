"""Choosing functions to trace by exact name, glob and cross-release alias, on real
builds of every toolchain (stripped too: names then come from pclntab alone)."""

from __future__ import annotations

import pytest

import gobuild
from goleash.gobin.binary import GoBinary
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.symbols import symbol_table
from goleash.probes.funcs import (
    FunctionIndex,
    FunctionNotFoundError,
    InlinedFunctionError,
    TooManyFunctionsError,
    resolve,
)


def index(fixture: str, toolchain: str, variant: str = "default") -> FunctionIndex:
    b = GoBinary(gobuild.build(fixture, toolchain, variant))
    return FunctionIndex(b, Pclntab.from_binary(b), symbol_table(b))


def framer_read_frame(toolchain: str) -> str:
    """Where this release's source puts the HTTP/2 framer's ReadFrame."""
    src = gobuild.go_root(toolchain) / "src" / "net" / "http"
    if (src / "internal" / "http2" / "frame.go").exists():
        return "net/http/internal/http2.(*Framer).ReadFrame"
    assert "func (fr *http2Framer) ReadFrame()" in (src / "h2_bundle.go").read_text()
    return "net/http.(*http2Framer).ReadFrame"


@pytest.mark.parametrize("variant", ["default", "stripped"])
def test_http2_alias_finds_readframe_in_any_release(toolchain: str, variant: str) -> None:
    idx = index("h2pair", toolchain, variant)
    want = framer_read_frame(toolchain)
    for pattern in ("http2.ReadFrame", "http2.Framer.ReadFrame", "http2.(*Framer).ReadFrame"):
        sel = resolve(idx, [pattern])
        assert [f.symbol for f in sel.functions] == [want]
        assert sel.describe() == [f"{pattern} -> {want} (alias)"]
    sel = resolve(idx, ["*ReadFrame", "net/http.(*conn).serve"])
    assert want in [f.symbol for f in sel.functions]
    assert sel.resolutions[1].how == "exact"
    assert all(f.size > 0 for f in sel.functions)


def test_exact_name_wins_and_duplicates_are_traced_once(toolchain: str) -> None:
    idx = index("funclat", toolchain)
    sel = resolve(idx, ["main.sleepFor", "main.sleep*", "main.*Panic"])
    assert [f.symbol for f in sel.functions] == [
        "main.sleepFor",
        "main.indexPanic",
        "main.mayPanic",
    ]
    assert sel.describe()[0] == "main.sleepFor"


def test_no_match_lists_close_matches(toolchain: str) -> None:
    idx = index("funclat", toolchain)
    with pytest.raises(FunctionNotFoundError, match=r"close matches: .*main\.sleepFor"):
        resolve(idx, ["main.sleepFr"])
    with pytest.raises(FunctionNotFoundError, match=r"package-qualified"):
        resolve(idx, ["sleepFor"])


def test_inlined_function_cannot_be_probed(toolchain: str) -> None:
    idx = index("funclat", toolchain, "stripped")
    with pytest.raises(InlinedFunctionError, match=r"main\.tiny: inlined into every caller"):
        resolve(idx, ["main.tiny"])
    with pytest.raises(InlinedFunctionError):
        resolve(idx, ["main.tin?"])


def test_too_broad_a_glob_is_refused() -> None:
    idx = index("funclat", gobuild.TOOLCHAINS[-1])
    with pytest.raises(TooManyFunctionsError, match="narrow the patterns"):
        resolve(idx, ["runtime.*"])
