"""Load a BpfImage (bpfimage.py) into the kernel with bpf(2): create its maps, patch
their fds into the programs, load and attach them. No compiler: milliseconds.

LoadedBpf offers what goleash uses of a BCC `BPF` object (tables by name, load_func,
perf buffers, tracepoints, the uprobe bookkeeping probes/uprobe.py relies on,
cleanup), so the attach code is the same for both. BCC's functions for perf buffers
and tracepoints are used through libbcc_bpf's C API: nothing here maps LLVM.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import re
import signal
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError
from goleash.probes.bpfimage import (
    PROG_TYPE_KPROBE,
    PROG_TYPE_TRACEPOINT,
    TRACEPOINT_PREFIX,
    BpfImage,
    MapSpec,
    patch_map_fds,
)
from goleash.probes.uprobe import (
    _BPF_ATTR_SIZE,
    PERF_LOST_CB,
    PERF_RAW_CB,
    bpf_syscall,
    libbcc_bpf,
)

_MAP_CREATE, _LOOKUP, _UPDATE, _DELETE, _NEXT_KEY, _PROG_LOAD = 0, 1, 2, 3, 4, 5
_LOOKUP_BATCH = 24
_ARRAY_TYPES = {2, 6}  # ARRAY, PERCPU_ARRAY: entries cannot be deleted, only zeroed
_BATCH = 4096  # entries per BPF_MAP_LOOKUP_BATCH call
_OBJ_NAME_LEN = 16
_PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_probe_repl = re.compile(b"[^a-zA-Z0-9_]")
log = logging.getLogger(__name__)


class BpfLoadError(GoleashError):
    """The kernel refused a map or a program of an image."""


def _name(name: str) -> bytes:
    return name.encode()[: _OBJ_NAME_LEN - 1]


def _cpus(kind: str) -> list[int]:
    """CPU numbers in /sys/devices/system/cpu/KIND ("0-3,5")."""
    out: list[int] = []
    for part in Path(f"/sys/devices/system/cpu/{kind}").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _libbcc() -> Any:
    return libbcc_bpf()


@dataclass
class Function:
    name: bytes
    fd: int


class BpfMap:
    """One map by fd, with ctypes key and value types given by the caller (checked
    against the map's sizes). Per-CPU maps read and write one value per possible CPU."""

    def __init__(self, spec: MapSpec, fd: int, key_type: Any, value_type: Any) -> None:
        if ctypes.sizeof(key_type) != spec.key_size or ctypes.sizeof(value_type) != spec.value_size:
            raise BpfLoadError(
                f"map {spec.name}: key/value are {spec.key_size}/{spec.value_size} bytes, "
                f"the caller's types {ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}"
            )
        self.spec, self.fd, self.Key = spec, fd, key_type
        self.Leaf = value_type
        if spec.map_type in _PERCPU_TYPES:
            if ctypes.sizeof(value_type) % 8:
                raise BpfLoadError(f"per-CPU map {spec.name}: values must be 8-byte multiples")
            self.Leaf = value_type * len(_cpus("possible"))

    def _attr(self, key: Any, value: Any = None, flags: int = 0) -> ctypes.Array[ctypes.c_uint8]:
        attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
        struct.pack_into(
            "<IIQQQ",
            attr,
            0,
            self.fd,
            0,
            ctypes.addressof(key) if key is not None else 0,
            ctypes.addressof(value) if value is not None else 0,
            flags,
        )
        return attr

    def __getitem__(self, key: Any) -> Any:
        value = self.Leaf()
        try:
            bpf_syscall(_LOOKUP, self._attr(key, value))
        except OSError as exc:
            raise KeyError(key) from exc
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        bpf_syscall(_UPDATE, self._attr(key, value))

    def __delitem__(self, key: Any) -> None:
        try:
            bpf_syscall(_DELETE, self._attr(key))
        except OSError as exc:
            raise KeyError(key) from exc

    def __iter__(self) -> Iterator[Any]:
        key: Any = None
        while True:
            nxt = self.Key()
            try:
                bpf_syscall(_NEXT_KEY, self._attr(key, nxt))
            except OSError:
                return  # ENOENT: the last key
            yield nxt
            key = nxt

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in self:
            with contextlib.suppress(KeyError):  # deleted meanwhile
                out.append((k, self[k]))
        return out

    def clear(self) -> None:
        for k in list(self):
            with contextlib.suppress(KeyError):
                del self[k]

    @property
    def map_fd(self) -> int:  # BCC's name
        return self.fd

    def clearitem(self, key: Any) -> None:
        """An array entry back to zeros (array entries cannot be deleted), as BCC's."""
        if self.spec.map_type not in _ARRAY_TYPES:
            raise BpfLoadError(f"map {self.spec.name}: clearitem is for arrays")
        self[key] = self.Leaf()

    def items_lookup_batch(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) with BPF_MAP_LOOKUP_BATCH, _BATCH entries a syscall
        (a walk key by key costs two syscalls an entry). OSError where the kernel or
        the map type has no batch lookups (before Linux 5.6)."""
        keys, values = (self.Key * _BATCH)(), (self.Leaf * _BATCH)()
        # The position token: a bucket number (hash) or a key (array), opaque here.
        size = max(8, self.spec.key_size)
        token_in, token_out = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)
        attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
        first = True
        while True:
            # union bpf_attr.batch: in_batch, out_batch, keys, values, count, map_fd
            struct.pack_into(
                "<QQQQII",
                attr,
                0,
                0 if first else ctypes.addressof(token_in),
                ctypes.addressof(token_out),
                ctypes.addressof(keys),
                ctypes.addressof(values),
                _BATCH,
                self.fd,
            )
            done = False
            try:
                bpf_syscall(_LOOKUP_BATCH, attr)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                done = True  # the last entries (count says how many, maybe 0)
            (count,) = struct.unpack_from("<I", attr, 32)
            ksize, vsize = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf)
            for i in range(count):  # copies: the next call reuses the arrays
                yield (
                    self.Key.from_buffer_copy(keys, i * ksize),
                    self.Leaf.from_buffer_copy(values, i * vsize),
                )
            if done or count == 0:
                return
            ctypes.memmove(token_in, token_out, size)
            first = False


class LoadedBpf:
    """An image's maps created and its tracepoint programs attached (as BCC does for
    TRACEPOINT_PROBE functions); other programs are loaded on demand (load_func).

    SIZES overrides maps' max_entries by name: one image serves processes that need
    tables of different capacities (a map's size is not part of the code)."""

    def __init__(self, image: BpfImage, sizes: Mapping[str, int] | None = None) -> None:
        unknown = set(sizes or {}) - {m.name for m in image.maps}
        if unknown:
            raise BpfLoadError(f"no map {', '.join(sorted(unknown))} in the image to size")
        if any(n <= 0 for n in (sizes or {}).values()):
            raise BpfLoadError(f"map sizes must be positive: {dict(sizes or {})}")
        self.image = dataclasses.replace(
            image,
            maps=tuple(
                dataclasses.replace(m, max_entries=(sizes or {}).get(m.name, m.max_entries))
                for m in image.maps
            ),
        )
        self.funcs: dict[bytes, Function] = {}
        self.tracepoint_fds: dict[bytes, int] = {}
        self.uprobe_fds: dict[bytes, int] = {}
        self._map_fds: dict[str, int] = {}
        self._maps: dict[str, BpfMap] = {}
        self._readers: list[int] = []
        self._callbacks: list[Any] = []
        self._progs = {p.name: p for p in image.progs}
        try:
            for spec in self.image.maps:
                self._map_fds[spec.name] = self._create_map(spec)
            for p in image.progs:
                if p.prog_type == PROG_TYPE_TRACEPOINT:
                    fn = self.load_func(p.name.encode(), PROG_TYPE_TRACEPOINT)
                    tp = p.name[len(TRACEPOINT_PREFIX) :].replace("__", ":").encode()
                    category, event = tp.split(b":", 1)
                    fd = _libbcc().bpf_attach_tracepoint(fn.fd, category, event)
                    if fd < 0:
                        raise BpfLoadError(f"attaching {p.name} to tracepoint {tp.decode()} failed")
                    self.tracepoint_fds[tp] = fd
        except BaseException:
            self.cleanup()
            raise

    @staticmethod
    def _create_map(spec: MapSpec) -> int:
        max_entries = spec.max_entries
        attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()
        struct.pack_into(
            "<IIIII",
            attr,
            0,
            spec.map_type,
            spec.key_size,
            spec.value_size,
            max_entries,
            spec.flags,
        )
        attr[28 : 28 + len(_name(spec.name))] = list(_name(spec.name))
        try:
            return bpf_syscall(_MAP_CREATE, attr)
        except OSError as exc:
            raise BpfLoadError(f"creating map {spec.name}: {exc.strerror}") from exc

    def map(self, name: str, key_type: Any, value_type: Any) -> BpfMap:
        if name not in self._maps:
            spec = next((m for m in self.image.maps if m.name == name), None)
            if spec is None:
                raise KeyError(name)
            self._maps[name] = BpfMap(spec, self._map_fds[name], key_type, value_type)
        return self._maps[name]

    def __getitem__(self, name: str) -> BpfMap:
        """A map already opened with map() (BCC-style access)."""
        return self._maps[name]

    def load_func(self, func_name: bytes, prog_type: int, attach_type: int = -1) -> Function:
        """Load one program (once: later calls return the same, as BCC's load_func)."""
        if func_name in self.funcs:
            return self.funcs[func_name]
        prog = self._progs.get(func_name.decode())
        if prog is None:
            raise BpfLoadError(f"no program {func_name.decode()} in the image")
        insns = patch_map_fds(prog, self._map_fds)
        buf = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(self.image.license.encode())
        log = ctypes.create_string_buffer(1 << 16)
        attr = (ctypes.c_uint8 * _BPF_ATTR_SIZE)()

        def load(log_level: int) -> int:
            struct.pack_into(
                "<IIQQIIQII",
                attr,
                0,
                prog_type,
                len(insns) // 8,
                ctypes.addressof(buf),
                ctypes.addressof(lic),
                log_level,
                len(log) if log_level else 0,
                ctypes.addressof(log) if log_level else 0,
                self.image.kern_version,
                0,
            )
            attr[48 : 48 + len(_name(prog.name))] = list(_name(prog.name))
            struct.pack_into("<I", attr, 68, attach_type if attach_type >= 0 else 0)
            return bpf_syscall(_PROG_LOAD, attr)

        try:
            fd = load(0)
        except OSError as exc:
            with contextlib.suppress(OSError):
                load(1)  # only for the verifier's words
            detail = " | ".join(log.value.decode(errors="replace").strip().splitlines()[-3:])
            raise OSError(
                exc.errno, f"loading {prog.name}: {exc.strerror} {detail}".strip()
            ) from exc
        fn = self.funcs[func_name] = Function(func_name, fd)
        return fn

    def unload_func(self, func_name: bytes) -> None:
        """Close a program loaded by load_func (a later load_func loads it again)."""
        fn = self.funcs.pop(func_name, None)
        if fn is not None:
            os.close(fn.fd)

    # --- perf buffers (libbcc's reader) -------------------------------------------------

    def open_perf_buffer(
        self, name: str, callback: Callable[[int, int, int], None], page_cnt: int = 8
    ) -> None:
        lib = _libbcc()
        table = self.map(name, ctypes.c_int, ctypes.c_int)
        for cpu in _cpus("online"):

            def raw(_cookie: int, data: int, size: int, _cpu: int = cpu) -> None:
                callback(_cpu, data, size)

            cb = PERF_RAW_CB(raw)
            self._callbacks.append(cb)  # alive as long as the reader
            reader = lib.bpf_open_perf_buffer(
                cb,
                PERF_LOST_CB(),  # NULL: lost events are not reported
                None,
                -1,
                cpu,
                page_cnt,
            )
            if not reader:
                raise BpfLoadError(f"cannot open the perf buffer of {name} on CPU {cpu}")
            self._readers.append(reader)
            table[ctypes.c_int(cpu)] = ctypes.c_int(lib.perf_reader_fd(reader))

    def perf_buffer_poll(self, timeout: int = -1) -> None:
        readers = (ctypes.c_void_p * len(self._readers))(*self._readers)
        _libbcc().perf_reader_poll(len(readers), readers, timeout)

    # --- what probes/uprobe.py's perf-event path uses of a BCC object --------------------

    def _get_uprobe_evname(self, prefix: bytes, path: bytes, addr: int, pid: int) -> bytes:
        return b"%s_%s_0x%x_%d" % (prefix, _probe_repl.sub(b"_", path), addr, pid)

    def _add_uprobe_fd(self, name: bytes, fd: int) -> None:
        self.uprobe_fds[name] = fd

    def detach_uprobe_event(self, ev_name: bytes) -> None:
        fd = self.uprobe_fds.pop(ev_name)
        lib = _libbcc()
        lib.bpf_close_perf_event_fd(fd)
        lib.bpf_detach_uprobe(ev_name)

    def detach_tracepoint(self, tp: bytes) -> None:
        fd = self.tracepoint_fds.pop(tp)
        lib = _libbcc()
        lib.bpf_close_perf_event_fd(fd)
        category, event = tp.split(b":", 1)
        lib.bpf_detach_tracepoint(category, event)

    def cleanup(self) -> None:
        """Detach everything, close every fd (idempotent)."""
        for ev in list(self.uprobe_fds):
            with contextlib.suppress(Exception):
                self.detach_uprobe_event(ev)
        for tp in list(self.tracepoint_fds):
            with contextlib.suppress(Exception):
                self.detach_tracepoint(tp)
        if self._readers:
            lib = _libbcc()
            for reader in self._readers:
                lib.perf_reader_free(reader)
            self._readers.clear()
        for fn in self.funcs.values():
            with contextlib.suppress(OSError):
                os.close(fn.fd)
        self.funcs.clear()
        for fd in self._map_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._map_fds.clear()
        self._maps.clear()


# --- compile once, load from the cache after ------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a program came from: "cache", or "compiled" and why the cache was not used."""

    source: str
    cache_miss: str = ""


# (image, program) the kernel took in this process. An image is the same bytes for
# every process that loads it, so its VERIFY programs are checked at its first load
# only, not once more per followed process (they are loaded again at attach anyway).
_verified: set[tuple[BpfImage, str]] = set()
_MAX_VERIFIED = 64


def _load_image(
    image: BpfImage,
    uprobe_programs: Sequence[str],
    verify: Sequence[str] = (),
    sizes: Mapping[str, int] | None = None,
) -> LoadedBpf:
    loaded = LoadedBpf(image, sizes)
    try:
        for prog in uprobe_programs:
            loaded.load_func(prog.encode(), PROG_TYPE_KPROBE)
        for prog in verify:
            if (image, prog) in _verified:
                continue
            loaded.load_func(prog.encode(), PROG_TYPE_KPROBE)
            loaded.unload_func(prog.encode())
            if len(_verified) >= _MAX_VERIFIED:
                _verified.clear()
            _verified.add((image, prog))
    except BaseException:
        loaded.cleanup()
        raise
    return loaded


def open_program(  # noqa: PLR0913 (each argument is a separate fact of the load)
    name: str,
    source: Path,
    cflags: list[str],
    uprobe_programs: Sequence[str] = (),
    *,
    verify: Sequence[str] = (),
    sizes: Mapping[str, int] | None = None,
) -> tuple[LoadedBpf, Origin]:
    """SOURCE (with every header beside it) loaded: from the image cache when it holds a
    trustworthy one the kernel accepts, else compiled by BCC and cached for next time.
    UPROBE_PROGRAMS are loaded at once (for perf-event uprobes), so a cached program
    the verifier refuses is found here and compiled again, not at an attach later.
    VERIFY programs are loaded and closed again: the same check for programs the
    caller loads later with another attach type (uprobe_multi). SIZES: maps'
    max_entries by name (LoadedBpf)."""
    from goleash.probes.bpfimage import (
        ImageError,
        cache_key,
        compile_in_child,
        read_cached,
        write_cached,
    )

    headers = sorted(source.parent.glob("*.h"))
    key = cache_key([source, *headers], cflags)
    try:
        image = read_cached(name, key)
        try:
            return _load_image(image, uprobe_programs, verify, sizes), Origin("cache")
        except (BpfLoadError, OSError) as exc:  # e.g. the verifier refused it
            miss = f"the kernel refused the cached program: {exc}"
    except ImageError as exc:
        miss = str(exc)
    if miss != "not cached yet":
        log.warning("BPF program cache for %s not used (%s): compiling", name, miss)
    try:
        image = compile_in_child(source.read_text(), cflags, key)
    except ImageError as exc:
        raise BpfLoadError(f"compiling {source.name} failed: {exc}") from exc
    # Before caching: only what the kernel took.
    loaded = _load_image(image, uprobe_programs, verify, sizes)
    write_cached(name, image)
    return loaded, Origin("compiled", miss)


# --- removing probes without waiting for the kernel -----------------------------------------

_SLOW_TO_CLOSE = ("anon_inode:[perf_event]", "anon_inode:bpf_link", "anon_inode:bpf-link")
_FDS_PER_MESSAGE = 250


def _slow_fds() -> list[int]:
    """This process's perf-event and BPF-link fds: closing the last reference to an
    attached tracepoint, uprobe or uprobe_multi link waits for RCU grace periods."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(f"/proc/self/fd/{name}") in _SLOW_TO_CLOSE:
                out.append(int(name))
    return out


class ReleaseHelper:
    """A process that takes the last references to our probes, so that their removal
    (the kernel waits ~0.05-0.2 s per batch here, and a process cannot exit while it
    waits) does not hold up ours: a CI job waits for `goleash check` to exit.

    Started early (a fork, while the process is small and has no threads yet); at
    close, `released_elsewhere()` sends it copies of this process's perf-event and
    link fds, so closing ours only drops references; when the block ends it exits
    and the last references go there. Extra references to probes we keep are
    harmless. When it cannot start or receive, closing just waits, as before."""

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    @classmethod
    def start(cls) -> ReleaseHelper:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
        except OSError:
            return cls(None)
        if pid == 0:  # pragma: no cover (a child process)
            try:
                ours.close()
                if os.fork() == 0:  # orphaned at once: nobody has to reap it
                    _hold_until_eof(theirs)
            finally:
                os._exit(0)
        theirs.close()
        os.waitpid(pid, 0)
        return cls(ours)

    @contextlib.contextmanager
    def released_elsewhere(self) -> Iterator[None]:
        if self._sock is not None:
            try:
                fds = _slow_fds()
                for i in range(0, len(fds), _FDS_PER_MESSAGE):
                    socket.send_fds(self._sock, [b"f"], fds[i : i + _FDS_PER_MESSAGE])
            except OSError:
                pass  # what it did not get is released here, waiting
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the helper reads EOF, exits, and the kernel releases
            self._sock = None


def _hold_until_eof(sock: socket.socket) -> None:  # pragma: no cover (a child process)
    os.setsid()  # its own session: a signal to the CI job's process group spares it
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # never keeps the job's pipes open
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    held: list[int] = []
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 16, _FDS_PER_MESSAGE + 3)
        held += fds
        if not msg:
            return
