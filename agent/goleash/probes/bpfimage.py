"""A compiled BPF program as data: its maps and instructions, cached on disk.

BCC compiles BPF C at run time (clang: ~1 s on an idle machine of this kind, several
on a busy one). For a command that runs for seconds (`goleash check`), that compile
is most of goleash's cost, and its result only changes with the source, the kernel
and BCC. So the compiled form is kept: the instructions of every function, with the
ld_imm64 instructions that carry a map's fd recorded as relocations against the
map's name, and each map's definition. bpfload.py creates the maps and loads the
programs from it with bpf(2), no compiler involved.

The cache is trusted only as far as it can be checked: a file is used when it is
owned by us in a directory only we can write, its key (source, cflags, kernel, BCC,
CPUs) matches, its checksum matches and its relocations point at ld_imm64
instructions of known maps; the kernel's verifier checks the rest at load. Anything
else is a miss (logged), and the program is compiled again.

A compile runs in a process of its own (compile_in_child): LLVM and clang, mapped and
running, cost ~150 MB of resident memory at the peak of a compile, and only mapping
them (`import bcc` loads libbcc, which links both) ~64 MB. In the caller's address
space that peak is the agent's memory high-water mark; in a child it is returned to
the system the moment the child exits, and a caller with a warm cache never maps
the compiler at all.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from goleash import cachefiles
from goleash.errors import GoleashError

log = logging.getLogger(__name__)

FORMAT = 1
INSN_SIZE = 8
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instructions, a 64-bit immediate
_PSEUDO_MAP_FD = 1  # src_reg of an ld_imm64 whose immediate is a map fd
PROG_TYPE_KPROBE = 2
PROG_TYPE_TRACEPOINT = 5
TRACEPOINT_PREFIX = "tracepoint__"  # BCC's TRACEPOINT_PROBE(cat, name) functions
MAX_MAPS = 64
MAX_PROGS = 64
MAX_INSNS = 1_000_000
MAX_FILE_BYTES = 16 << 20
KEEP_IMAGES = 16  # per program name (tests build a dozen sizes of goroutines.bpf.c)
COMPILE_TIMEOUT_S = 300.0  # a compile takes 1-5 s here, more on a crowded node


class ImageError(GoleashError):
    """A BPF image cannot be built, read or trusted."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class ProgSpec:
    name: str
    insns: bytes
    relocs: tuple[tuple[int, str], ...]  # (instruction index, map name)

    @property
    def prog_type(self) -> int:
        return PROG_TYPE_TRACEPOINT if self.name.startswith(TRACEPOINT_PREFIX) else PROG_TYPE_KPROBE


@dataclass(frozen=True)
class BpfImage:
    key: str  # what it was compiled from, hashed (cache_key)
    license: str
    kern_version: int
    maps: tuple[MapSpec, ...]
    progs: tuple[ProgSpec, ...]

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "key": self.key,
            "license": self.license,
            "kern_version": self.kern_version,
            "maps": [vars(m) for m in self.maps],
            "progs": [
                {
                    "name": p.name,
                    "insns": base64.b64encode(p.insns).decode(),
                    "relocs": [list(r) for r in p.relocs],
                }
                for p in self.progs
            ],
        }
        text = json.dumps(body, sort_keys=True)
        return json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": text})

    @classmethod
    def from_json(cls, data: str) -> BpfImage:
        """Parse and check an image; ImageError on anything unexpected."""
        try:
            outer = json.loads(data)
            text = outer["body"]
            if hashlib.sha256(text.encode()).hexdigest() != outer["sha256"]:
                raise ImageError("checksum mismatch (corrupt file)")
            body = json.loads(text)
            if body["format"] != FORMAT:
                raise ImageError(f"format {body['format']}, expected {FORMAT}")
            maps = tuple(
                MapSpec(**{k: m[k] for k in MapSpec.__dataclass_fields__}) for m in body["maps"]
            )
            progs = tuple(
                ProgSpec(
                    str(p["name"]),
                    base64.b64decode(p["insns"], validate=True),
                    tuple((int(i), str(n)) for i, n in p["relocs"]),
                )
                for p in body["progs"]
            )
            image = cls(
                str(body["key"]), str(body["license"]), int(body["kern_version"]), maps, progs
            )
        except ImageError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImageError(f"malformed: {type(exc).__name__}: {exc}") from exc
        image.validate()
        return image

    def validate(self) -> None:
        if not 0 < len(self.maps) <= MAX_MAPS or not 0 < len(self.progs) <= MAX_PROGS:
            raise ImageError(f"{len(self.maps)} maps, {len(self.progs)} programs")
        names = {m.name for m in self.maps}
        for m in self.maps:
            if not (
                0 < m.key_size <= 512 and 0 < m.value_size <= 65536 and 0 < m.max_entries <= 1 << 24
            ):
                raise ImageError(f"map {m.name}: implausible sizes")
        for p in self.progs:
            n = len(p.insns) // INSN_SIZE
            if len(p.insns) % INSN_SIZE or not 0 < n <= MAX_INSNS:
                raise ImageError(f"program {p.name}: {len(p.insns)} bytes of instructions")
            for idx, name in p.relocs:
                if name not in names or not 0 <= idx < n - 1 or not _is_map_load(p.insns, idx):
                    raise ImageError(f"program {p.name}: bad relocation {idx} -> {name}")


def _is_map_load(insns: bytes, idx: int) -> bool:
    code, regs = insns[idx * INSN_SIZE], insns[idx * INSN_SIZE + 1]
    return code == _LD_IMM64 and regs >> 4 == _PSEUDO_MAP_FD


def patch_map_fds(prog: ProgSpec, fds: dict[str, int]) -> bytes:
    """The instructions with each relocation's immediate set to its map's fd."""
    out = bytearray(prog.insns)
    for idx, name in prog.relocs:
        struct.pack_into("<i", out, idx * INSN_SIZE + 4, fds[name])
    return bytes(out)


# --- the key: what the compiled code depends on ---------------------------------------------


def cache_key(source_files: list[Path], cflags: list[str]) -> str:
    """Source text (the .c and every header beside it), cflags, the kernel (release,
    build, the headers BCC compiles against, its tracepoint formats come with it),
    BCC's version and the number of possible CPUs (the perf array's size)."""
    h = hashlib.sha256()
    for path in source_files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    uts = os.uname()
    build = Path(f"/lib/modules/{uts.release}/build")
    parts = [*cflags, uts.release, uts.version, str(build.resolve()), _bcc_version(), _possible()]
    h.update("\0".join(parts).encode())
    return h.hexdigest()


def _bcc_version() -> str:
    """BCC's version without importing it (its import loads LLVM: ~0.1 s)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        raise ImageError("BCC's Python module is missing (Debian: python3-bpfcc)")
    try:
        return (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return "unknown"


def _possible() -> str:
    try:
        return Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return str(os.cpu_count())


# --- compiling with BCC and taking the result apart ---------------------------------------


def compile_image(source: str, cflags: list[str], key: str) -> BpfImage:
    """Compile with BCC (no program is loaded or attached) and extract the image."""
    from bcc import lib  # the only package that imports bcc

    bcc = _Libbcc.get()
    flags = (ctypes.c_char_p * len(cflags))(*[f.encode() for f in cflags])
    module = lib.bpf_module_create_c_from_string(source.encode(), 0, flags, len(flags), True, None)
    if not module:
        raise ImageError("BCC could not compile the program (see the messages above)")
    try:
        maps, by_fd = [], {}
        for i in range(bcc.bpf_num_tables(module)):
            name = bcc.bpf_table_name(module, i).decode()
            fd = bcc.bpf_table_fd_id(module, i)
            maps.append(
                MapSpec(
                    name,
                    bcc.bpf_table_type_id(module, i),
                    bcc.bpf_table_key_size_id(module, i),
                    bcc.bpf_table_leaf_size_id(module, i),
                    bcc.bpf_table_max_entries_id(module, i),
                    bcc.bpf_table_flags_id(module, i),
                )
            )
            by_fd[fd] = name
        progs = []
        for i in range(bcc.bpf_num_functions(module)):
            name = bcc.bpf_function_name(module, i)
            start, size = bcc.bpf_function_start(module, name), bcc.bpf_function_size(module, name)
            insns = ctypes.string_at(start, size)
            progs.append(ProgSpec(name.decode(), insns, _relocations(name.decode(), insns, by_fd)))
        image = BpfImage(
            key,
            bcc.bpf_module_license(module).decode(),
            bcc.bpf_module_kern_version(module),
            tuple(maps),
            tuple(progs),
        )
    finally:
        lib.bpf_module_destroy(module)  # closes its maps
    image.validate()
    return image


def compile_in_child(source: str, cflags: list[str], key: str) -> BpfImage:
    """compile_image run by a new Python process (see the module's docstring); its
    compiler messages go to our stderr, as an in-process compile's would."""
    request = json.dumps({"source": source, "cflags": cflags, "key": key})
    env = dict(os.environ)
    # The child imports this package from where we did (a checkout, a wheel).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "goleash.probes.bpfimage"],
            input=request.encode(),
            stdout=subprocess.PIPE,
            env=env,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"the compiler process failed: {exc}") from exc
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        why = out.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ImageError(why[0][:500])
    image = BpfImage.from_json(out)
    if image.key != key:
        raise ImageError("the compiler process compiled another program")
    return image


def _child_main() -> int:  # pragma: no cover (runs in compile_in_child's process)
    """Read a request on stdin, write the image (or the one-line reason) on stdout."""
    # Only the answer goes to stdout: anything libbcc or clang prints goes to stderr.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with answer:
        try:
            request = json.loads(sys.stdin.read())
            image = compile_image(request["source"], list(request["cflags"]), request["key"])
        except ImageError as exc:
            answer.write(f"{exc}\n")
            return 3
        answer.write(image.to_json())
    return 0


def _relocations(name: str, insns: bytes, by_fd: dict[int, str]) -> tuple[tuple[int, str], ...]:
    relocs = []
    i, n = 0, len(insns) // INSN_SIZE
    while i < n:
        code, regs = insns[i * INSN_SIZE], insns[i * INSN_SIZE + 1]
        if code == _LD_IMM64:
            src = regs >> 4
            if src == _PSEUDO_MAP_FD:
                (fd,) = struct.unpack_from("<i", insns, i * INSN_SIZE + 4)
                if fd not in by_fd:
                    raise ImageError(f"{name}: instruction {i} loads fd {fd}, not a map of it")
                relocs.append((i, by_fd[fd]))
            elif src != 0:
                raise ImageError(f"{name}: instruction {i}: unsupported ld_imm64 kind {src}")
            i += 2
        else:
            i += 1
    return tuple(relocs)


class _Libbcc:
    """libbcc's module introspection functions (public C API; bcc's Python module
    declares only some of them)."""

    _lib: ctypes.CDLL | None = None

    @classmethod
    def get(cls) -> ctypes.CDLL:
        if cls._lib is None:
            lib = ctypes.CDLL("libbcc.so.0", use_errno=True)
            vp, ull, cp = ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_char_p
            sigs = {
                "bpf_num_tables": ([vp], ull),
                "bpf_table_name": ([vp, ull], cp),
                "bpf_table_fd_id": ([vp, ull], ctypes.c_int),
                "bpf_table_type_id": ([vp, ull], ctypes.c_int),
                "bpf_table_key_size_id": ([vp, ull], ctypes.c_size_t),
                "bpf_table_leaf_size_id": ([vp, ull], ctypes.c_size_t),
                "bpf_table_max_entries_id": ([vp, ull], ull),
                "bpf_table_flags_id": ([vp, ull], ctypes.c_int),
                "bpf_num_functions": ([vp], ull),
                "bpf_function_name": ([vp, ull], cp),
                "bpf_function_start": ([vp, cp], vp),
                "bpf_function_size": ([vp, cp], ctypes.c_size_t),
                "bpf_module_license": ([vp], cp),
                "bpf_module_kern_version": ([vp], ctypes.c_uint),
            }
            for fn, (args, res) in sigs.items():
                f = getattr(lib, fn)
                f.argtypes, f.restype = args, res
            cls._lib = lib
        return cls._lib


# --- the cache ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """goleash.cachefiles: where, and what is trusted."""
    return cachefiles.cache_dir("bpf")


def cache_file(name: str, key: str) -> Path:
    return cache_dir() / f"{name}-{key[:32]}.json"


def read_cached(name: str, key: str) -> BpfImage:
    """The cached image for KEY; ImageError (the reason) when there is none to trust."""
    path = cache_file(name, key)
    if not path.parent.exists():
        raise ImageError("not cached yet")
    try:
        data = cachefiles.read_trusted(path, MAX_FILE_BYTES)
    except FileNotFoundError as exc:
        raise ImageError("not cached yet") from exc
    except OSError as exc:
        raise ImageError(str(exc) if exc.strerror is None else f"{path}: {exc.strerror}") from exc
    try:
        image = BpfImage.from_json(data.decode())
    except UnicodeDecodeError as exc:
        raise ImageError(f"{path}: not text") from exc
    if image.key != key:
        raise ImageError(f"{path}: compiled for another source, kernel or BCC")
    return image


def write_cached(name: str, image: BpfImage) -> Path | None:
    """Store IMAGE (atomically: concurrent runs never see half a file). A cache that
    cannot be written is logged, never an error."""
    path = cache_file(name, image.key)
    try:
        # Bounded: the newest few stay (two goleash versions in turn must not thrash).
        cachefiles.write_atomic(path, image.to_json(), KEEP_IMAGES, f"{name}-*.json")
    except OSError as exc:
        log.warning("BPF program cache not written (%s): the next run compiles again", exc)
        return None
    return path


if __name__ == "__main__":  # pragma: no cover (compile_in_child's process)
    sys.exit(_child_main())
