"""GoBinary.elf_symbols answers from the file's bytes (no dict of every symbol kept):
every name gives what pyelftools' reading of .symtab gives, the last symbol of a
name winning, and names that are not there give nothing."""

from __future__ import annotations

import pytest

import gobuild
from goleash.gobin.binary import ElfSymbols, GoBinary


@pytest.mark.parametrize("toolchain", [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]])
def test_every_symbol_answers_as_the_whole_table_reads(toolchain: str) -> None:
    with GoBinary(gobuild.build("spawner", toolchain, "pie")) as b:
        want: dict[str, tuple[int, int]] = {}
        for sym in b.elf.get_section_by_name(".symtab").iter_symbols():  # type: ignore[union-attr]
            if sym.name and sym["st_value"]:
                want[sym.name] = (sym["st_value"], sym["st_size"])
        syms = b.elf_symbols
        assert isinstance(syms, ElfSymbols)
        assert len(want) > 1000
        assert all(syms.get(name) == hit for name, hit in want.items())
        assert dict(syms.items()) == want and len(syms) == len(want)
        for absent in ("", "runtime.no_such_symbol", "untime.goexit1", "runtime.goexit1\0x"):
            assert syms.get(absent) is None and absent not in syms
        with pytest.raises(KeyError):
            syms["runtime.no_such_symbol"]
        goexit = syms["runtime.goexit1"]
    # Answers stay readable after the binary is closed (an analysis shared on).
    assert syms.get("runtime.goexit1") == goexit
    assert syms.get("runtime.gopark") == want["runtime.gopark"]
