"""Go's pclntab read in pure Python: functions, and PC -> function/file:line.

Every Go binary carries it, stripped (`-ldflags=-s -w`) or not, because the runtime
needs it for tracebacks and the GC. Layouts handled (Go's src/debug/gosym/pclntab.go,
src/runtime/symtab.go):

| magic      | Go        | functab                      | pcHeader words after the 8-byte prefix |
|------------|-----------|------------------------------|----------------------------------------|
| 0xfffffffa | 1.16-1.17 | (entry uintptr, funcoff)     | nfunc nfiles funcname cu file pc pcln  |
| 0xfffffff0 | 1.18-1.19 | (entryoff u32, funcoff u32)  | nfunc nfiles textStart funcname ...    |
| 0xfffffff1 | 1.20+     | as 1.18                      | as 1.18                                |

From Go 1.18 function entries are offsets from the start of Go text (moduledata.text).
pcHeader.textStart held that too, but is 0 from Go 1.26 on (it needed a relocation),
and the `.text` section is not it either when the external linker put C start-up code
first (cgo binaries): so the text start comes from `runtime.firstmoduledata`.

All addresses here are link-time virtual addresses: for a PIE process add the load
bias. Inlined calls are not expanded: `source_line` gives the innermost file:line at a
PC (what the pcln table records) and the name of the physical function holding the
PC, as the runtime's own traceback line "created by F ... file:line" does.
"""

from __future__ import annotations

import bisect
import contextlib
import fnmatch
import struct
import weakref
from array import array
from dataclasses import dataclass
from functools import cached_property

from goleash.errors import printable
from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import BinaryError, NotGoError, UnsupportedGoVersionError, parse_guard

_U32 = struct.Struct("<I")

MAGIC_GO116 = 0xFFFFFFFA
MAGIC_GO118 = 0xFFFFFFF0
MAGIC_GO120 = 0xFFFFFFF1
MAGIC_GO12 = 0xFFFFFFFB  # Go 1.2-1.15: stack ABI, never supported
_MAGICS = (MAGIC_GO116, MAGIC_GO118, MAGIC_GO120)

# moduledata starts (Go 1.16+) with: pcHeader *pcHeader, then six slices (funcnametab,
# cutab, filetab, pctab, pclntable, ftab: ptr/len/cap each), findfunctab, minpc,
# maxpc, text, etext. Indexes in 8-byte words.
_MD_FUNCNAMETAB, _MD_CUTAB, _MD_FILETAB, _MD_PCTAB, _MD_PCLNTABLE = 1, 4, 7, 10, 13
_MD_TEXT = 22
_MD_WORDS = 24

_PCL_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")


@dataclass(frozen=True)
class Func:
    name: str
    entry: int  # link-time vaddr of the first instruction
    end: int  # entry of the next function (padding included)
    # Go 1.17+ gives a function called across ABIs a linker-made wrapper of the same
    # name: Go code gets an ABI0 wrapper for assembly callers, assembly gets an
    # ABIInternal wrapper for Go callers. The ELF .symtab tells them apart by a
    # ".abi0" suffix on the ABI0 one; pclntab only by the wrapper's funcID.
    wrapper: bool = False


@dataclass(frozen=True)
class SourceLine:
    function: str
    file: str
    line: int


@dataclass(frozen=True)
class _Header:
    vaddr: int
    magic: int
    nfunc: int
    nfiles: int
    text_start: int  # 0 when not stored (Go 1.16/1.17, Go 1.26+)
    funcname_off: int
    cu_off: int
    filetab_off: int
    pctab_off: int
    pcln_off: int


_cache: weakref.WeakKeyDictionary[GoBinary, Pclntab] = weakref.WeakKeyDictionary()


class Pclntab:
    """The function table and line tables of one Go binary."""

    @parse_guard
    def __init__(self, binary: GoBinary) -> None:
        # Keeps no reference to `binary`: the cache below is keyed weakly by it.
        self.path = binary.path
        hdr, moduledata = _locate(binary)
        self.header = hdr
        self.magic = hdr.magic
        self.moduledata = moduledata  # vaddr of runtime.firstmoduledata, when found
        self.text_start = _text_start(binary, hdr, moduledata)
        self._buf = _bytes_from(binary, hdr.vaddr)
        self._funcnametab = hdr.funcname_off
        self._cutab = hdr.cu_off
        self._filetab = hdr.filetab_off
        self._pctab = hdr.pctab_off
        self._pclntable = hdr.pcln_off
        self._old = hdr.magic == MAGIC_GO116  # absolute uintptr entries
        # _func fields after the entry are uint32s; the entry is a uintptr before 1.18.
        self._field0 = 8 if self._old else 4
        # The funcID byte follows 8 uint32 fields, and startLine from Go 1.20.
        self._funcid_off = self._field0 + 8 * 4 + (4 if hdr.magic == MAGIC_GO120 else 0)
        try:
            self._entries, self._funcoffs = self._read_functab()
        except (struct.error, IndexError) as exc:
            raise NotGoError(f"{self.path}: damaged Go pclntab ({exc})") from None

    @classmethod
    def from_binary(cls, binary: GoBinary) -> Pclntab:
        """Parsed once per GoBinary object and cached."""
        tab = _cache.get(binary)
        if tab is None:
            tab = cls(binary)
            _cache[binary] = tab
        return tab

    # --- function table --------------------------------------------------------

    def _read_functab(self) -> tuple[array[int], array[int]]:
        # Arrays, not lists of ints: a tenth of the memory, kept as long as the binary.
        n = self.header.nfunc
        buf = self._buf
        off = self._pclntable
        if self._old:
            words = struct.unpack_from(f"<{2 * n + 1}Q", buf, off)
            entries = array("Q", words[0::2])
        else:
            words = struct.unpack_from(f"<{2 * n + 1}I", buf, off)
            ts = self.text_start
            entries = array("Q", (ts + e for e in words[0::2]))
        funcoffs = array("Q", words[1::2])
        if any(b < a for a, b in zip(entries, entries[1:], strict=False)):
            raise NotGoError(f"{self.path}: damaged Go pclntab (function table unsorted)")
        return entries, funcoffs  # entries has one extra: the end of the last function

    @cached_property
    @parse_guard
    def _wrappers(self) -> frozenset[int]:
        """Indexes of the linker-made ABI wrappers (see Func). Names are read once to
        find them and not kept: an agent asks few functions of each binary, and
        every name as a Func cost ~1 MB per binary (measured: 22 MB for 21)."""
        return self._wrappers_among(self._raw_names())

    def _wrappers_among(self, names: list[bytes]) -> frozenset[int]:
        first: dict[bytes, int] = {}
        wrapper: set[int] = set()
        for i, name in enumerate(names):
            j = first.setdefault(name, i)
            if j != i:
                # FuncIDWrapper is the last FuncID of every Go version, so of the two
                # the wrapper has the larger funcID.
                wrapper.add(j if self._func_id(i) <= self._func_id(j) else i)
        return frozenset(wrapper)

    def _raw_names(self) -> list[bytes]:
        """Every function's name as stored, by index: the name table split once
        (at C speed) instead of one string search per function (a stripped binary's
        name index was a third of the CPU of following its first process)."""
        start = self._funcnametab
        later = [o for o in (self._cutab, self._filetab, self._pctab, self._pclntable) if o > start]
        region = bytes(self._buf[start : min(later, default=len(self._buf))])
        at: dict[int, bytes] = {}
        pos = 0
        for name in region.split(b"\0")[:-1]:  # the last piece has no terminator
            at[pos] = name
            pos += len(name) + 1
        names = []
        unpack, buf = _U32.unpack_from, self._buf
        base = self._pclntable + self._field0  # where a func's nameOff is
        for fo in self._funcoffs:
            (off,) = unpack(buf, base + fo)
            found = at.get(off)
            if found is None:  # not where a name starts (or past the table): as before
                found = self._cstring(start + off).encode("utf-8", "surrogateescape")
            names.append(found)
        return names

    def _func_at(self, i: int) -> Func:
        e = self._entries
        return Func(self._func_name(i), e[i], e[i + 1], i in self._wrappers)

    @property
    @parse_guard
    def functions(self) -> list[Func]:
        """Every function, sorted by entry; ABI wrappers included (see Func). Made
        afresh at each call: for the rare caller that wants them all."""
        return [self._func_at(i) for i in range(len(self._funcoffs))]

    @cached_property
    def _by_name(self) -> dict[str, int]:
        """Name -> index of the function itself (never its wrapper)."""
        out: dict[str, int] = {}
        names = self._raw_names()
        if "_wrappers" not in self.__dict__:  # from the same names: not read twice
            self.__dict__["_wrappers"] = self._wrappers_among(names)
        wrappers = self._wrappers
        for i, name in enumerate(names):
            if i not in wrappers:
                out.setdefault(printable(name.decode("utf-8", "replace")), i)
        return out

    @parse_guard
    def func_by_name(self, name: str) -> Func | None:
        """The function itself, never its ABI wrapper."""
        i = self._by_name.get(name)
        if i is None and "[" in name:
            i = self._by_name.get(_elide_brackets(name))
        return None if i is None else self._func_at(i)

    @parse_guard
    def funcs_matching(self, pattern: str) -> list[Func]:
        """Functions whose name matches a shell glob, e.g. "net/http.(*conn).*"."""
        return [
            self._func_at(i)
            for name, i in self._by_name.items()
            if fnmatch.fnmatchcase(name, pattern)
        ]

    def _index_for_pc(self, pc: int) -> int | None:
        i = bisect.bisect_right(self._entries, pc) - 1
        if i < 0 or i >= len(self._funcoffs):
            return None
        return i

    @parse_guard
    def func_for_pc(self, pc: int) -> Func | None:
        i = self._index_for_pc(pc)
        return None if i is None else self._func_at(i)

    # --- lines -------------------------------------------------------------------

    @parse_guard
    def source_line(self, pc: int) -> SourceLine | None:
        """Function and file:line of the instruction at `pc`.

        For a return address (a saved PC, a stack frame's PC) pass pc - 1 so the
        answer is the CALL's line, not the next statement's; `call_site` does that.
        """
        i = self._index_for_pc(pc)
        if i is None:
            return None
        entry = self._entries[i]
        fo = self._pclntable + self._funcoffs[i]
        pcfile = self._func_field(fo, 5)
        pcln = self._func_field(fo, 6)
        cu = self._func_field(fo, 8)
        fno = self._pcvalue(pcfile, entry, pc)
        line = self._pcvalue(pcln, entry, pc)
        if fno < 0 or line < 0 or cu == 0xFFFFFFFF:  # ~0: a function without a CU
            return None
        (file_off,) = struct.unpack_from("<I", self._buf, self._cutab + (cu + fno) * 4)
        if file_off == 0xFFFFFFFF:
            return None
        return SourceLine(self._func_name(i), self._cstring(self._filetab + file_off), line)

    @parse_guard
    def call_site(self, return_pc: int) -> SourceLine | None:
        """The line of the CALL whose return address is `return_pc`.

        A goroutine's `gopc` is such an address (newproc's caller PC, just after the
        CALL of the `go` statement); this is what runtime/traceback.go printcreatedby1
        prints: function at the PC, line at PC-1 unless the PC is the entry.
        """
        f = self.func_for_pc(return_pc)
        if f is None:
            return None
        src = self.source_line(return_pc - 1 if return_pc > f.entry else return_pc)
        return None if src is None else SourceLine(f.name, src.file, src.line)

    # --- raw decoding --------------------------------------------------------------

    def _func_field(self, func_off: int, n: int) -> int:
        (v,) = struct.unpack_from("<I", self._buf, func_off + self._field0 + (n - 1) * 4)
        return int(v)

    def _func_id(self, i: int) -> int:
        return self._buf[self._pclntable + self._funcoffs[i] + self._funcid_off]

    def _func_name(self, i: int) -> str:
        fo = self._pclntable + self._funcoffs[i]
        return self._cstring(self._funcnametab + self._func_field(fo, 1))

    def _cstring(self, off: int) -> str:
        buf = self._buf
        if not 0 <= off < len(buf):
            raise ValueError(f"string at {off} outside the pclntab")
        end, step = off, 256
        while True:  # a view of the file has no index(): look chunk by chunk
            chunk = bytes(buf[end : end + step])
            if not chunk:
                raise ValueError(f"unterminated string at {off} in the pclntab")
            at = chunk.find(b"\0")
            if at >= 0:
                end += at
                break
            end, step = end + len(chunk), min(step * 2, 1 << 16)
        # Names end up on terminals, in logs and label values: no control characters.
        return printable(bytes(buf[off:end]).decode("utf-8", "replace"))

    def _pcvalue(self, off: int, entry: int, target: int) -> int:
        # A pc-value table is a sequence of (value delta zig-zag varint, pc delta
        # varint) pairs starting at (entry, -1); a 0 value delta ends it, except first.
        if off == 0:
            return -1
        buf = self._buf
        p = self._pctab + off
        pc, val, first = entry, -1, True
        while True:
            uv, p = _uvarint(buf, p)
            if uv == 0 and not first:
                return -1
            first = False
            val += -((uv >> 1) + 1) if uv & 1 else uv >> 1
            pcdelta, p = _uvarint(buf, p)
            pc += pcdelta  # quantum is 1 on amd64
            if target < pc:
                return val


def _elide_brackets(name: str) -> str:
    # Go 1.18-1.20 linkers store a name's outermost [...] span (type arguments, array
    # lengths in type..eq.[5]T) as "[...]" in pclntab; .symtab has the full name.
    i, j = name.find("["), name.rfind("]")
    return name if j <= i else name[:i] + "[...]" + name[j + 1 :]


def _uvarint(buf: bytes | memoryview, p: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[p]
        p += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, p
        shift += 7


# --- finding it ------------------------------------------------------------------------


def _bytes_from(binary: GoBinary, vaddr: int) -> memoryview:
    """The file bytes from vaddr to the end of its segment's file image: a view of the
    binary's mapping, not a copy. The pages stay the page cache's (shared with the
    process running the file, dropped under pressure) instead of megabytes of heap
    per binary; the view keeps the mapping alive after the binary is closed."""
    for seg in binary.segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
            start = seg.offset + vaddr - seg.vaddr
            return memoryview(binary.data)[start : seg.offset + seg.filesz]
    raise NotGoError(f"{binary.path}: Go pclntab at {vaddr:#x} is not backed by the file")


def _parse_header(binary: GoBinary, vaddr: int) -> _Header | None:
    try:
        raw = binary.read(vaddr, 8 + 8 * 8)
    except BinaryError:
        return None
    magic = int.from_bytes(raw[:4], "little")
    if magic == MAGIC_GO12:
        raise UnsupportedGoVersionError(
            f"{binary.path}: built with Go older than 1.16 (pclntab of Go 1.2-1.15); "
            "Go < 1.17 uses the stack ABI and the oldest supported is Go 1.17"
        )
    if magic not in _MAGICS or raw[4:6] != b"\0\0" or raw[6] != 1 or raw[7] != 8:
        return None
    w = struct.unpack_from("<8Q", raw, 8)
    if magic == MAGIC_GO116:
        nfunc, nfiles, fname, cu, ftab, pctab, pcln = w[:7]
        text_start = 0
    else:
        nfunc, nfiles, text_start, fname, cu, ftab, pctab, pcln = w
    offs = (fname, cu, ftab, pctab, pcln)
    if not 0 < nfunc < 1 << 24 or not all(0 < o < 1 << 32 for o in offs):
        return None
    return _Header(vaddr, magic, nfunc, nfiles, text_start, fname, cu, ftab, pctab, pcln)


def _is_moduledata(binary: GoBinary, md: int, hdr: _Header) -> bool:
    try:
        raw = binary.read(md, _MD_WORDS * 8)
    except BinaryError:
        return False
    w = struct.unpack(f"<{_MD_WORDS}Q", raw)
    h = hdr.vaddr
    expect = {
        0: h,
        _MD_FUNCNAMETAB: h + hdr.funcname_off,
        _MD_CUTAB: h + hdr.cu_off,
        _MD_FILETAB: h + hdr.filetab_off,
        _MD_PCTAB: h + hdr.pctab_off,
        _MD_PCLNTABLE: h + hdr.pcln_off,
    }
    if any(w[i] != v for i, v in expect.items()):
        return False
    text = w[_MD_TEXT]
    return any(s.executable and s.vaddr <= text < s.vaddr + s.memsz for s in binary.segments)


def _find_moduledata(binary: GoBinary, hdr: _Header) -> int | None:
    sym = binary.elf_symbols.get("runtime.firstmoduledata")
    if sym is not None and _is_moduledata(binary, sym[0], hdr):
        return sym[0]
    # Stripped: moduledata is in writable data and its first word points at the
    # pcHeader. The linker writes link-time values in place even where a dynamic
    # relocation also applies (PIE), so the file bytes can be searched.
    needle = struct.pack("<Q", hdr.vaddr)
    for seg in binary.segments:
        if seg.executable or not seg.filesz:
            continue
        end = seg.offset + seg.filesz
        i = binary.data.find(needle, seg.offset, end)
        while i >= 0:
            md = seg.vaddr + i - seg.offset
            if md % 8 == 0 and _is_moduledata(binary, md, hdr):
                return md
            i = binary.data.find(needle, i + 1, end)
    return None


def _scan_headers(binary: GoBinary) -> list[int]:
    """Addresses of every plausible pcHeader prefix in the non-code segments."""
    out = []
    for seg in binary.segments:
        if seg.executable or not seg.filesz:
            continue
        end = seg.offset + seg.filesz
        for magic in _MAGICS:
            needle = struct.pack("<I", magic) + b"\0\0\x01\x08"
            i = binary.data.find(needle, seg.offset, end)
            while i >= 0:
                if i % 8 == 0:
                    out.append(seg.vaddr + i - seg.offset)
                i = binary.data.find(needle, i + 1, end)
    return out


def _locate(binary: GoBinary) -> tuple[_Header, int | None]:
    candidates: list[int] = []
    for name in _PCL_SECTIONS:
        sec = binary.section(name)
        if sec is not None and sec.size:
            candidates.append(sec.vaddr)
    syms = binary.elf_symbols
    for name in ("runtime.pcheader", "runtime.pclntab"):
        if name in syms:
            candidates.append(syms[name][0])
    if "runtime.firstmoduledata" in syms:
        with contextlib.suppress(BinaryError):
            candidates.append(binary.read_u64(syms["runtime.firstmoduledata"][0]))
    for vaddr in candidates:
        hdr = _parse_header(binary, vaddr)
        if hdr is not None:
            return hdr, _find_moduledata(binary, hdr)
    # No section, no symbol (e.g. externally linked PIE, stripped): a pcHeader is
    # only believed when a moduledata points at it.
    for vaddr in _scan_headers(binary):
        hdr = _parse_header(binary, vaddr)
        if hdr is not None:
            md = _find_moduledata(binary, hdr)
            if md is not None:
                return hdr, md
    raise NotGoError(f"{binary.path}: ELF file but not a Go binary (no Go pclntab found)")


def _text_start(binary: GoBinary, hdr: _Header, moduledata: int | None) -> int:
    if hdr.magic == MAGIC_GO116:
        return 0  # entries are absolute
    if moduledata is not None:
        return binary.read_u64(moduledata + _MD_TEXT * 8)
    if hdr.text_start:
        return hdr.text_start
    if "runtime.text" in binary.elf_symbols:
        return binary.elf_symbols["runtime.text"][0]
    raise NotGoError(
        f"{binary.path}: cannot find where Go code starts (no runtime.firstmoduledata, "
        "no runtime.text); the binary looks damaged"
    )
