"""The Go build info a linker embeds in every module-aware Go binary.

Layout (see Go's src/debug/buildinfo/buildinfo.go): a 16-byte aligned blob starting
with the magic `\\xff Go buildinf:` (14 bytes), a pointer size byte and a flags byte.

- Go 1.18+ (flags & 2): the blob's 32-byte header is followed by two varint-prefixed
  strings, the Go version and the module info.
- Go <= 1.17 (pointer format): header bytes 16.. hold two pointers to Go string
  headers (ptr, len) for the version and the module info.

The module info is framed by 16-byte sentinels and has the text format of
runtime/debug.BuildInfo.String(): `path`, `mod`, `dep`, `=>` and `build key=value`
lines, values with spaces quoted as Go strings.

Devel toolchains report versions like "devel go1.24-abc123 Tue Jan 1 ..."; those parse
best-effort to the release they precede, (1, 24, 0), because their runtime layouts are
that release's. A version with no "go1.N" in it raises UnsupportedGoVersionError.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from goleash.errors import printable
from goleash.gobin.binary import GoBinary
from goleash.gobin.errors import BinaryError, NotGoError, UnsupportedGoVersionError, parse_guard

MAGIC = b"\xff Go buildinf:"
_ALIGN = 16
_HEADER_SIZE = 32
_FLAGS_BIG_ENDIAN = 0x1
_FLAGS_INLINE_STRINGS = 0x2

OLDEST_SUPPORTED = (1, 17, 0)

_VERSION_RE = re.compile(r"go(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class BuildInfo:
    go_version: str  # as the toolchain reports it, e.g. "go1.22.10"
    version: tuple[int, int, int]
    main_module: str | None  # the `mod` line's path; None for GOPATH/file builds
    settings: dict[str, str] = field(default_factory=dict)  # the `build` lines
    # Go < 1.20 never records -buildmode; read_build_info then infers it from the ELF
    # type (ET_DYN -> "pie") and keeps it here.
    inferred_buildmode: str = "exe"
    main_package: str | None = None  # the `path` line: "cmd/compile", "example.com/x.test"
    # `dep` lines (after `=>` replacements): module path -> version
    deps: dict[str, str] = field(default_factory=dict)

    @property
    def buildmode(self) -> str:
        return self.settings.get("-buildmode", self.inferred_buildmode)

    @property
    def cgo(self) -> bool:
        return self.settings.get("CGO_ENABLED") == "1"

    @property
    def trimpath(self) -> bool:
        return self.settings.get("-trimpath") == "true"


def parse_go_version(s: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a Go version string; rc/beta/devel suffixes dropped.

    "go1.22" -> (1, 22, 0), "go1.21rc2" -> (1, 21, 0), "go1.22.10" -> (1, 22, 10),
    "devel go1.24-abc Tue ..." -> (1, 24, 0).
    """
    m = _VERSION_RE.search(s)
    if m is None:
        raise UnsupportedGoVersionError(
            f"cannot understand Go version {s!r}; expected something like go1.22.10"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_supported(info: BuildInfo) -> None:
    """Raise UnsupportedGoVersionError for toolchains goleash cannot probe."""
    if info.version < OLDEST_SUPPORTED:
        raise UnsupportedGoVersionError(
            f"built with {info.go_version}: Go < 1.17 uses the stack ABI, which goleash "
            "does not probe; the oldest supported is Go 1.17 (rebuild with a newer Go)"
        )


@parse_guard
def read_build_info(binary: GoBinary) -> BuildInfo:
    """Build info of a Go binary; NotGoError when it has none."""
    addr = _find_blob(binary)
    if addr is None:
        raise NotGoError(f"{binary.path}: ELF file but not a Go binary (no Go build info)")
    header = binary.read(addr, _HEADER_SIZE)
    flags = header[15]
    if flags & _FLAGS_INLINE_STRINGS:
        vers, next_addr = _read_varint_string(binary, addr + _HEADER_SIZE)
        mod, _ = _read_varint_string(binary, next_addr)
    else:
        order = "big" if flags & _FLAGS_BIG_ENDIAN else "little"
        ptr_size = header[14]
        if ptr_size not in (4, 8):
            raise NotGoError(f"{binary.path}: damaged Go build info (pointer size {ptr_size})")
        vers = _read_go_string(binary, header[16 : 16 + ptr_size], ptr_size, order)
        mod = _read_go_string(binary, header[16 + ptr_size : 16 + 2 * ptr_size], ptr_size, order)
    if not vers:
        raise NotGoError(f"{binary.path}: ELF file but not a Go binary (empty Go build info)")
    # Sentinels (cmd/go's infoStart/infoEnd) frame the module info: 16 bytes each side.
    mod = mod[16:-16] if len(mod) >= 33 and mod[-17] == "\n" else ""
    main_module, settings = _parse_modinfo(mod)
    main_package, deps = _parse_packages(mod)
    return BuildInfo(
        printable(vers[:200]),
        parse_go_version(vers),
        main_module,
        settings,
        inferred_buildmode="pie" if binary.is_pie else "exe",
        main_package=main_package,
        deps=deps,
    )


def _find_blob(binary: GoBinary) -> int | None:
    sec = binary.section(".go.buildinfo")
    if sec is not None:
        ranges = [(sec.vaddr, sec.size)]
    else:
        # Go < 1.18 on some targets and section-stripped files: the linker puts the
        # blob near the start of the writable data, so search the writable segments.
        ranges = [(s.vaddr, s.filesz) for s in binary.segments if not s.executable and s.filesz]
    for start, size in ranges:
        try:
            data = binary.read(start, size)
        except BinaryError:
            continue
        i = data.find(MAGIC)
        while i >= 0:
            if (start + i) % _ALIGN == 0 and i + _HEADER_SIZE <= len(data):
                return start + i
            i = data.find(MAGIC, i + 1)
    return None


def _read_varint_string(binary: GoBinary, addr: int) -> tuple[str, int]:
    raw = binary.read(addr, 10)
    length = shift = n = 0
    for n, b in enumerate(raw, 1):  # noqa: B007 (n is the varint's length)
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    else:
        raise NotGoError(f"{binary.path}: damaged Go build info (bad string length)")
    if length > 1 << 20:
        raise NotGoError(f"{binary.path}: damaged Go build info (string of {length} bytes)")
    data = binary.read(addr + n, length)
    return data.decode("utf-8", "replace"), addr + n + length


def _read_go_string(binary: GoBinary, ptr: bytes, ptr_size: int, order: str) -> str:
    hdr = binary.read(int.from_bytes(ptr, order), 2 * ptr_size)  # type: ignore[arg-type]
    data_addr = int.from_bytes(hdr[:ptr_size], order)  # type: ignore[arg-type]
    length = int.from_bytes(hdr[ptr_size:], order)  # type: ignore[arg-type]
    if not data_addr or length > 1 << 20:
        return ""
    return binary.read(data_addr, length).decode("utf-8", "replace")


def _parse_modinfo(mod: str) -> tuple[str | None, dict[str, str]]:
    main_module: str | None = None
    settings: dict[str, str] = {}
    for line in mod.split("\n"):
        if line.startswith("mod\t"):
            main_module = printable(line.split("\t")[1]) or None
        elif line.startswith("build\t"):
            key, value = _split_setting(line[len("build\t") :])
            if key:  # shown to people: no control characters
                settings[printable(key)] = printable(value)
    return main_module, settings


def _parse_packages(mod: str) -> tuple[str | None, dict[str, str]]:
    """The `path` line and the dependencies (`dep`, replaced by a following `=>`)."""
    path: str | None = None
    deps: dict[str, str] = {}
    last: str | None = None
    for line in mod.split("\n"):
        parts = line.split("\t")
        if parts[0] == "path" and len(parts) > 1:
            path = parts[1] or None
        elif parts[0] == "dep" and len(parts) > 2:
            last = parts[1]
            deps[last] = parts[2]
        elif parts[0] == "=>" and len(parts) > 2 and last is not None:
            deps[last] = f"{parts[1]} {parts[2]}" if parts[1] != last else parts[2]
    return path, deps


def _split_setting(kv: str) -> tuple[str, str]:
    # Keys or values containing spaces, quotes or tabs are written as Go quoted
    # strings (strconv.Quote); for printable text that is a valid Python literal.
    if kv[:1] in ('"', "`"):
        end = _quoted_prefix_end(kv)
        key, rest = _unquote(kv[:end]), kv[end + 1 :]
    else:
        key, _, rest = kv.partition("=")
    value = _unquote(rest) if rest[:1] in ('"', "`") else rest
    return key, value


def _quoted_prefix_end(s: str) -> int:
    q = s[0]
    i = 1
    while i < len(s):
        if s[i] == "\\" and q == '"':
            i += 2
            continue
        if s[i] == q:
            return i + 1
        i += 1
    return len(s)


def _unquote(s: str) -> str:
    if s.startswith("`") and s.endswith("`") and len(s) >= 2:
        return s[1:-1]
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s
    return value if isinstance(value, str) else s
