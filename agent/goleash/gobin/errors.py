"""Why a binary or a process cannot be read. Each message says what to do next."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from goleash.errors import GoleashError


class BinaryError(GoleashError):
    """A file cannot be used as a Go binary."""


class NotELFError(BinaryError):
    """The file is not an ELF executable."""


class NotGoError(BinaryError):
    """An ELF file without Go's build info or pclntab."""


class DamagedBinaryError(NotGoError):
    """An ELF file whose structures contradict themselves or the file's size: the
    kernel may still run it (it reads only the program headers), goleash does not."""


class UnsupportedGoVersionError(BinaryError):
    """Go older than the register ABI (1.17), or not understood."""


class OffsetsUnavailableError(BinaryError):
    """Neither DWARF nor the committed table gives runtime struct offsets."""


class SymbolNotFoundError(BinaryError):
    """A function or variable the probes need is not in the binary."""


class ProbeSiteError(BinaryError):
    """A function's code does not hold the instruction a probe must be placed on."""


class ProcessError(GoleashError):
    """A PID that does not exist, exited, or cannot be read."""


# --- one boundary for every parser -------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def damaged(where: object, exc: BaseException) -> BinaryError:
    """The BinaryError a parser raises for input it could not make sense of."""
    detail = str(exc) or type(exc).__name__
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return DamagedBinaryError(
        f"{where}: damaged or unreadable binary ({type(exc).__name__}: {detail})"
    )


def parse_guard(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Any failure inside a parser of untrusted bytes (pyelftools, capstone, struct,
    slicing past the end, absurd sizes, recursion) leaves it as a BinaryError: a file
    is either a Go binary goleash reads, or one it reports it cannot read."""

    @functools.wraps(fn)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except GoleashError:
            raise
        except (Exception, RecursionError, MemoryError) as exc:
            first = args[0] if args else None
            where = getattr(first, "path", None) or (
                first if isinstance(first, str | os.PathLike) else fn.__qualname__
            )
            raise damaged(where, exc) from None

    return guarded
