"""Symbol addresses of a Go binary, stripped or not.

With an ELF .symtab every function and variable is there. A stripped binary
(`-ldflags=-s -w`) keeps Go's pclntab, which knows functions only: data symbols such
as `runtime.allgs` cannot be found in it.

Names: the .symtab calls an assembly function's body "name.abi0", so a lookup of
"name" that finds nothing there tries "name.abi0". From pclntab, "name" is the
function body and never its linker-made ABI wrapper; a ".abi0" suffix is ignored.
(For the few assembly functions that also have an ABIInternal wrapper, such as
runtime.reflectcall, .symtab's "name" is that wrapper.)

Addresses are link-time virtual addresses (add the load bias for a PIE process).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import SymbolNotFoundError, parse_guard
from goleash.gobin.pclntab import Pclntab

_ABI0 = ".abi0"


@dataclass(frozen=True, eq=False)
class SymbolTable:
    path: str
    source: Literal["symtab", "pclntab"]
    _elf: Mapping[str, tuple[int, int]]
    _pclntab: Pclntab | None

    def lookup(self, name: str) -> tuple[int, int] | None:
        """(address, size) of a function or (with .symtab) a variable, or None."""
        if self._pclntab is None:
            hit = self._elf.get(name)
            if hit is None and not name.endswith(_ABI0):
                hit = self._elf.get(name + _ABI0)
            return hit
        f = self._pclntab.func_by_name(name.removesuffix(_ABI0))
        return None if f is None else (f.entry, f.end - f.entry)

    def require(self, name: str) -> tuple[int, int]:
        hit = self.lookup(name)
        if hit is not None:
            return hit
        if self.source == "pclntab":
            raise SymbolNotFoundError(
                f"{self.path}: no function {name} in the Go pclntab. The binary is stripped "
                "(no .symtab), so only functions can be found: data symbols such as "
                "runtime.allgs exist only in .symtab (build without -ldflags=-s)"
            )
        raise SymbolNotFoundError(
            f"{self.path}: no symbol {name} in .symtab (a function the linker removed "
            "as unused or the compiler inlined everywhere, or a Go version without it)"
        )


@parse_guard
def symbol_table(binary: GoBinary) -> SymbolTable:
    """Symbols from .symtab when present, else functions from pclntab."""
    if binary.has_symtab:
        return SymbolTable(str(binary.path), "symtab", binary.elf_symbols, None)
    return SymbolTable(str(binary.path), "pclntab", {}, Pclntab.from_binary(binary))
