"""An ELF file opened once and read by virtual address.

Everything in `gobin` sits on `GoBinary`: build info, pclntab, DWARF and the
disassembler all ask it for bytes at a virtual address or for a section.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from goleash.gobin.errors import (
    BinaryError,
    DamagedBinaryError,
    NotELFError,
    NotGoError,
    parse_guard,
)


@dataclass(frozen=True)
class Section:
    name: str
    vaddr: int
    offset: int
    size: int


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment: [vaddr, vaddr+filesz) is backed by the file at offset."""

    vaddr: int
    offset: int
    filesz: int
    memsz: int
    executable: bool


_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
MAX_REMEMBERED_LOOKUPS = 4096


class ElfSymbols(Mapping[str, tuple[int, int]]):
    """An ELF64 little-endian .symtab, looked up in the file's own bytes.

    A dict of every symbol cost ~1.9 MB of Python objects per binary (tracemalloc:
    26 MB for the 14 binaries with .symtab of the fleet bench), kept as long as any
    process ran it, for the handful of names an agent ever asks. This keeps views
    of the two sections (page cache, not heap) and finds a name when asked: every
    place the string table holds it, then the symbols naming that place; the last
    symbol with an address wins, as a dict filled in table order would have it.
    Answers are remembered (a few names per binary). Iterating decodes them all.
    """

    def __init__(self, data: mmap.mmap, strtab: tuple[int, int], symtab: tuple[int, int]) -> None:
        # A view keeps the mapping open past GoBinary.close (mmap refuses to close
        # while exported), so searching the mmap itself stays valid.
        self._data, self._view = data, memoryview(data)
        (self._str_off, str_size), (self._sym_off, sym_size) = strtab, symtab
        self._str_end = self._str_off + str_size
        self._count = sym_size // _SYM.size
        self._name_offs: bytes | None = None  # st_name of each symbol, packed
        self._asked: dict[str, tuple[int, int] | None] = {}

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name in self._asked:
            found = self._asked[name]
        else:
            found = self._find(name)
            if len(self._asked) < MAX_REMEMBERED_LOOKUPS:
                self._asked[name] = found
        return default if found is None else found

    def _symtab(self) -> memoryview:
        return self._view[self._sym_off : self._sym_off + self._count * _SYM.size]

    def _names(self) -> bytes:
        if self._name_offs is None:  # 4 bytes a symbol: searched in C, not in Python
            names = array("I", (e[0] for e in _SYM.iter_unpack(self._symtab())))
            self._name_offs = names.tobytes()
        return self._name_offs

    def _find(self, name: str) -> tuple[int, int] | None:
        want = name.encode("utf-8", "surrogateescape")
        if not want or b"\0" in want:
            return None
        data, lo, hi = self._data, self._str_off, self._str_end
        places = []
        at = data.find(want + b"\0", lo + 1, hi)
        while at >= 0:
            places.append(at - lo)
            at = data.find(want + b"\0", at + 1, hi)
        tail = hi - len(want)
        if tail > lo and data[tail:hi] == want:  # an unterminated last string
            places.append(tail - lo)
        names, best = self._names(), -1
        for place in places:
            key = struct.pack("<I", place)
            at = names.find(key)
            while at >= 0:
                if at % 4 == 0:
                    i = at // 4
                    if _SYM.unpack_from(self._view, self._sym_off + i * _SYM.size)[4]:
                        best = max(best, i)
                at = names.find(key, at + 1)
        if best < 0:
            return None
        entry = _SYM.unpack_from(self._view, self._sym_off + best * _SYM.size)
        return (entry[4], entry[5])

    def __getitem__(self, name: str) -> tuple[int, int]:
        found = self.get(name)
        if found is None:
            raise KeyError(name)
        return found  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def _all(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        strings = bytes(self._view[self._str_off : self._str_end])
        for name_off, _i, _o, _s, value, size in _SYM.iter_unpack(self._symtab()):
            if not name_off or not value or name_off >= len(strings):
                continue
            end = strings.find(b"\0", name_off)
            name = strings[name_off : end if end >= 0 else len(strings)]
            out[name.decode("utf-8", "replace")] = (value, size)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class GoBinary:
    """A Go executable on disk (or behind /proc/PID/exe), read without running it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open `path` once: everything after (the cache key, every byte parsed) comes
        from that one open file, so an exec or a replaced file between two reads can
        never mix two executables. `key` names that inode: a process is checked against
        it after its probes are placed (GoProcess.same_executable)."""
        self.path = Path(path)
        try:
            # O_NONBLOCK: a FIFO named like an executable must not hang the caller.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise BinaryError(f"{self.path}: no such file") from None
        except PermissionError:
            raise BinaryError(f"{self.path}: permission denied (run as root?)") from None
        except IsADirectoryError:
            raise BinaryError(f"{self.path}: is a directory, not an executable") from None
        except OSError as exc:
            raise BinaryError(f"{self.path}: cannot open ({exc.strerror})") from None
        self.fd = fd
        self._data: mmap.mmap | None = None
        # Results derived from the file's bytes, shared by every copy of the same
        # bytes when gobin.shared hands this binary out (else None: not memoised).
        self.memo: dict[str, Any] | None = None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise BinaryError(f"{self.path}: is a directory, not an executable")
            if not stat.S_ISREG(st.st_mode):
                raise NotELFError(f"{self.path}: not a regular file")
            # (device, inode, size, mtime): one version of one file, the cache key.
            self.key: tuple[int, int, int, int] = (
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            )
            if st.st_size < 64:
                raise NotELFError(f"{self.path}: not an ELF file (only {st.st_size} bytes)")
            self._data = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            if self.data[:4] != b"\x7fELF":
                raise NotELFError(f"{self.path}: not an ELF file; goleash reads Go executables")
            if self.data[4] != 2:  # EI_CLASS: ELFCLASS64
                raise NotELFError(
                    f"{self.path}: a 32-bit ELF file; goleash reads x86-64 Go executables"
                )
            self._open_elf()
        except BaseException:
            self.close()
            raise

    @property
    def data(self) -> mmap.mmap:
        """The file's bytes (one mapping of the fd judged), while the binary is open."""
        if self._data is None:
            raise BinaryError(f"{self.path}: read after close")
        return self._data

    @parse_guard
    def _open_elf(self) -> None:
        try:
            self.elf = ELFFile(self.data)  # type: ignore[arg-type]
        except ELFError as exc:
            raise DamagedBinaryError(f"{self.path}: damaged ELF file ({exc})") from None
        if self.elf.get_machine_arch() != "x64":
            raise BinaryError(
                f"{self.path}: {self.elf.get_machine_arch()} binary; goleash supports x86-64 only"
            )
        # Read every header now, inside the guard: later reads of a damaged table
        # (e_shoff past the end, absurd counts) must not surface elsewhere.
        if self.elf.num_sections() > 4096 or self.elf.num_segments() > 1024:
            raise DamagedBinaryError(f"{self.path}: damaged ELF file (implausible header counts)")
        size = len(self.data)
        for s in self.elf.iter_sections():
            if s["sh_type"] != "SHT_NOBITS" and s["sh_offset"] + s["sh_size"] > size:
                raise DamagedBinaryError(
                    f"{self.path}: truncated or damaged ELF file (section {s.name or '?'} "
                    f"ends at {s['sh_offset'] + s['sh_size']}, past the file's {size} bytes)"
                )
        for seg in self.segments:
            if seg.offset + seg.filesz > size:
                raise DamagedBinaryError(
                    f"{self.path}: truncated or damaged ELF file (a segment ends at "
                    f"{seg.offset + seg.filesz}, past the file's {size} bytes)"
                )

    # --- layout ---------------------------------------------------------------

    @cached_property
    @parse_guard
    def is_pie(self) -> bool:
        return bool(self.elf.header["e_type"] == "ET_DYN")

    @cached_property
    @parse_guard
    def sections(self) -> dict[str, Section]:
        out: dict[str, Section] = {}
        for s in self.elf.iter_sections():
            if s.name:
                out[s.name] = Section(s.name, s["sh_addr"], s["sh_offset"], s["sh_size"])
        return out

    def section(self, name: str) -> Section | None:
        return self.sections.get(name)

    @parse_guard
    def section_data(self, name: str) -> bytes | None:
        s = self.elf.get_section_by_name(name)
        return None if s is None else s.data()

    @cached_property
    @parse_guard
    def segments(self) -> list[Segment]:
        return [
            Segment(
                p["p_vaddr"],
                p["p_offset"],
                p["p_filesz"],
                p["p_memsz"],
                bool(p["p_flags"] & P_FLAGS.PF_X),
            )
            for p in self.elf.iter_segments()
            if p["p_type"] == "PT_LOAD"
        ]

    def vaddr_to_offset(self, vaddr: int) -> int:
        """File offset of a virtual address: what a uprobe is attached at."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                return vaddr - seg.vaddr + seg.offset
        raise BinaryError(f"{self.path}: address {vaddr:#x} is not backed by the file")

    def read(self, vaddr: int, size: int) -> bytes:
        """Bytes at a virtual address, as the loader maps them (zero past filesz)."""
        if not 0 <= size <= len(self.data) + (1 << 24):
            raise NotGoError(f"{self.path}: implausible read of {size} bytes at {vaddr:#x}")
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                start = vaddr - seg.vaddr
                n_file = max(0, min(size, seg.filesz - start))
                off = seg.offset + start
                chunk = bytes(self.data[off : off + n_file])
                return chunk + b"\0" * (size - len(chunk))
        raise BinaryError(f"{self.path}: address {vaddr:#x} is outside every segment")

    def read_u64(self, vaddr: int) -> int:
        return int.from_bytes(self.read(vaddr, 8), "little")

    # --- what is in it ----------------------------------------------------------

    @cached_property
    @parse_guard
    def has_symtab(self) -> bool:
        s = self.elf.get_section_by_name(".symtab")
        return s is not None and s.num_symbols() > 1  # type: ignore[attr-defined]

    @cached_property
    def has_dwarf(self) -> bool:
        return any(n in self.sections for n in (".debug_info", ".zdebug_info"))

    @cached_property
    @parse_guard
    def elf_symbols(self) -> Mapping[str, tuple[int, int]]:
        """name -> (address, size) from .symtab; empty when stripped."""
        s = self.elf.get_section_by_name(".symtab")
        if s is None:
            return {}
        if self.elf.elfclass == 64 and self.elf.little_endian:
            strtab = self.elf.get_section(s["sh_link"])
            return ElfSymbols(
                self.data,
                (strtab["sh_offset"], strtab["sh_size"]),
                (s["sh_offset"], s["sh_size"]),
            )
        out: dict[str, tuple[int, int]] = {}
        for sym in s.iter_symbols():  # type: ignore[attr-defined]
            if sym.name and sym["st_value"]:
                out[sym.name] = (sym["st_value"], sym["st_size"])
        return out

    def release_pages(self) -> None:
        """Drop this mapping's resident pages after a whole-file pass (analysis reads
        DWARF, symbols, pclntab): they stay in the page cache, shared, and the few that
        later reads need fault back in. A read-only file mapping loses nothing."""
        if self._data is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError):
                self._data.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._data is not None:
            # A Pclntab's view of the mapping may outlive the binary: the mapping (and
            # the descriptor mmap keeps of its own) then goes with the last view.
            with contextlib.suppress(BufferError):
                self._data.close()
            self._data = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        # A binary dropped without close() must not keep its descriptor open for good.
        if getattr(self, "fd", -1) >= 0:
            with contextlib.suppress(Exception):
                self.close()

    def __enter__(self) -> GoBinary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
