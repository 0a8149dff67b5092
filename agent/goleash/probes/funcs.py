"""Which functions `goleash latency --func PATTERN` traces in a given Go binary.

A pattern is one of:

- an exact symbol as Go names it: `net/http.(*conn).serve`, `main.handler`;
- a glob: `*` matches any run of characters (dots and slashes too), `?` one character;
  nothing else is special, so generic names like `main.Map[...].Get` are literal;
- an alias `PKG.NAME` for code that moves between packages across Go releases.
  `http2.ReadFrame` finds `ReadFrame` wherever the binary's Go release put HTTP/2:
  bundled into net/http with an `http2` prefix (`net/http.(*http2Framer).ReadFrame`,
  Go <= 1.26), `net/http/internal/http2.(*Framer).ReadFrame` (Go 1.27), or the
  x/net module the program imports (`golang.org/x/net/http2.(*Framer).ReadFrame`).
  `http2.Framer.ReadFrame` and `http2.(*Framer).ReadFrame` name the receiver too.

An exact name wins over an alias. Every pattern says what it resolved to.

A function the compiler inlined into all its callers has no code of its own: its name
survives only in the inline tables of its callers (pclntab's function-name table),
which is how it is told apart from a name that does not exist. Calls inlined into
some callers of a function that also exists out of line are not seen either.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import SymbolNotFoundError
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.symbols import SymbolTable

MAX_FUNCTIONS = 32  # each costs two BPF programs and a uprobe per RET

# alias -> (package path, prefix the package puts on the alias's names), in the order
# Go releases used them.
PACKAGE_ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "http2": (
        ("net/http", "http2"),  # h2_bundle.go, Go <= 1.26
        ("net/http/internal/http2", ""),  # Go 1.27
        ("golang.org/x/net/http2", ""),  # the x/net module, when the program imports it
        ("vendor/golang.org/x/net/http2", ""),
    ),
}


class FunctionNotFoundError(SymbolNotFoundError):
    """A pattern matched no function of the binary."""


class InlinedFunctionError(SymbolNotFoundError):
    """The function exists in the source but was inlined into every caller."""


class TooManyFunctionsError(SymbolNotFoundError):
    """The patterns select more functions than goleash will probe at once."""


@dataclass(frozen=True)
class TracedFunction:
    symbol: str
    addr: int  # link-time entry
    size: int


@dataclass(frozen=True)
class Resolution:
    pattern: str
    how: Literal["exact", "glob", "alias"]
    symbols: tuple[str, ...]
    inlined: tuple[str, ...] = ()  # a glob's matches that were inlined: not probed

    def describe(self) -> str:
        out = self.pattern
        if self.how != "exact":
            out += f" -> {', '.join(self.symbols)} ({self.how})"
        if self.inlined:
            out += f"; inlined everywhere, not probed: {', '.join(self.inlined)}"
        return out


@dataclass
class Selection:
    functions: list[TracedFunction] = field(default_factory=list)
    resolutions: list[Resolution] = field(default_factory=list)

    def describe(self) -> list[str]:
        return [r.describe() for r in self.resolutions]


class FunctionIndex:
    """The function names of one binary, for matching patterns."""

    def __init__(self, binary: GoBinary, pclntab: Pclntab, symbols: SymbolTable) -> None:
        self.binary = binary
        self.pclntab = pclntab
        self.symbols = symbols

    @cached_property
    def names(self) -> list[str]:
        return sorted({f.name for f in self.pclntab.functions if not f.wrapper})

    @cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    @cached_property
    def inlined_only(self) -> frozenset[str]:
        """Names that appear in pclntab's function-name table only through inline trees."""
        h = self.pclntab.header
        blob = self.binary.read(h.vaddr + h.funcname_off, h.cu_off - h.funcname_off)
        names = {x.decode("utf-8", "replace") for x in blob.split(b"\0") if x}
        return frozenset(names - self._name_set)

    def has(self, name: str) -> bool:
        return name in self._name_set

    def matching(self, regex: re.Pattern[str]) -> list[str]:
        return [n for n in self.names if regex.fullmatch(n)]

    def close_matches(self, pattern: str, n: int = 5) -> list[str]:
        """Names a user may have meant: the same last component in another package, then
        similar spellings, then names containing the last component."""
        last = re.split(r"[.*?]", pattern.rstrip(".*?"))[-1].lower()
        plain = pattern.replace("*", "").replace("?", "")
        out: list[str] = [x for x in self.names if x.lower().endswith("." + last)][:n]
        for x in difflib.get_close_matches(plain, self.names, n=n, cutoff=0.75):
            if x not in out:
                out.append(x)
        if len(last) >= 3:
            out += [x for x in self.names if last in x.lower() and x not in out]
        return out[:n]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` any run, `?` one character, the rest literal (Go names hold [ ] ( ) *)."""
    parts = []
    for ch in pattern:
        parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(parts))


def _is_glob(pattern: str) -> bool:
    # "(*T)" is a pointer receiver, not a wildcard.
    return "?" in pattern or "*" in pattern.replace("(*", "(")


def alias_regex(pattern: str) -> re.Pattern[str] | None:
    """The names an alias `PKG.REST` stands for in any release, or None if not an alias."""
    short, _, rest = pattern.partition(".")
    places = PACKAGE_ALIASES.get(short)
    if not rest or places is None:
        return None
    wild = _is_glob(rest)

    def lit(s: str) -> str:
        return glob_regex(s).pattern if wild else re.escape(s)

    m = re.fullmatch(r"\(\*([^.()]+)\)\.([^()]+)|([^.()]+)\.([^.()]+)", rest)
    alts = []
    for pkg, prefix in places:
        p = re.escape(pkg) + r"\."
        if m:  # receiver given: (*T).M or T.M
            typ, meth = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            t = re.escape(prefix) + lit(typ)
            alts.append(rf"{p}(?:\(\*{t}\)|{t})\.{lit(meth)}")
        else:  # a function, or a method of any type of the package
            t = re.escape(prefix) + r"[^.()]*"
            alts.append(rf"{p}(?:{re.escape(prefix)}{lit(rest)}|(?:\(\*{t}\)|{t})\.{lit(rest)})")
    return re.compile("|".join(alts))


def resolve(index: FunctionIndex, patterns: Sequence[str]) -> Selection:
    """Resolve patterns to probe-able functions, or raise with what the user can do."""
    sel = Selection()
    seen: set[str] = set()
    for pattern in patterns:
        how: Literal["exact", "glob", "alias"]
        if index.has(pattern):
            how, names = "exact", [pattern]
        elif (rx := alias_regex(pattern)) is not None and (names := index.matching(rx)):
            how = "alias"
        elif _is_glob(pattern):
            how, names = "glob", index.matching(glob_regex(pattern))
        else:
            names = []
        if not names:
            raise _not_found(index, pattern)
        inlined: tuple[str, ...] = ()
        if how == "glob":
            grx = glob_regex(pattern)
            inlined = tuple(sorted(n for n in index.inlined_only if grx.fullmatch(n)))
        sel.resolutions.append(Resolution(pattern, how, tuple(names), inlined))
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            found = index.symbols.lookup(name)
            if found is None:  # in pclntab but not .symtab: should not happen for Go code
                raise FunctionNotFoundError(f"{index.binary.path}: {name}: no address found")
            sel.functions.append(TracedFunction(name, found[0], found[1]))
    if len(sel.functions) > MAX_FUNCTIONS:
        sample = ", ".join(f.symbol for f in sel.functions[:5])
        raise TooManyFunctionsError(
            f"the patterns select {len(sel.functions)} functions ({sample}, ...); goleash "
            f"traces at most {MAX_FUNCTIONS} at once: narrow the patterns"
        )
    return sel


def _not_found(index: FunctionIndex, pattern: str) -> SymbolNotFoundError:
    inlined = (
        [n for n in index.inlined_only if glob_regex(pattern).fullmatch(n)]
        if _is_glob(pattern)
        else [pattern]
        if pattern in index.inlined_only
        else []
    )
    if inlined:
        return InlinedFunctionError(
            f"{', '.join(sorted(inlined)[:5])}: inlined into every caller by the compiler, "
            "so there is no function to probe. Trace its callers, or rebuild with "
            "//go:noinline on it (or -gcflags=-l)"
        )
    close = index.close_matches(pattern)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    if "." not in pattern:
        hint += " (Go symbols are package-qualified, e.g. main.handler)"
    return FunctionNotFoundError(f"no function matches {pattern!r} in {index.binary.path}{hint}")
