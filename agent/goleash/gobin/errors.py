"""Why a binary or a process cannot be read. Each message says what to do next."""

from __future__ import annotations

from goleash.errors import GoleashError


class BinaryError(GoleashError):
    """A file cannot be used as a Go binary."""


class NotELFError(BinaryError):
    """The file is not an ELF executable."""


class NotGoError(BinaryError):
    """An ELF file without Go's build info or pclntab."""


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
