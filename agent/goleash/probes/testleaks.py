"""BCC side of `goleash check` (bpf/check.bpf.c): follow a command's process tree
and attribute goroutines to the tests that created them.

One program serves every followed process of every Go release: the runtime offsets
of each process are a map entry, so BCC compiles once per run (a compile costs
seconds on a busy machine; a test binary lives for milliseconds). The program stops
a process (SIGSTOP from BPF) at the moments user space must act before it runs on:
right after exec (to attach probes before the first Go instruction) and at
runtime.exit (to read the goroutines still blocked before they vanish). The caller
always sends the SIGCONT.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from goleash.errors import GoleashError
from goleash.probes.bpfload import ReleaseHelper, open_program
from goleash.probes.uprobe import GroupAttacher

if TYPE_CHECKING:  # names only: `goleash check` loads this module while BCC compiles,
    # and the binary analysis (pyelftools: ~35 ms) is not needed for that.
    from goleash.gobin.disasm import GoroutineProbeSites, ProbeSite
    from goleash.gobin.offsets import RuntimeOffsets

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
MAX_FOLLOWED = 65536
MAX_LIVE = 65536
MAX_TESTS = 16384
MAX_PROCS = 4096
MAX_SKIP = 1024  # paths of executables judged not to follow
PATH_LEN = 256  # check.bpf.c's CHK_PATH_LEN
FOLLOW_EXEC, FOLLOW_EXIT, PROCESS_EXIT = 1, 2, 3
# Probes go in as uprobe_multi links (Linux >= 6.6, probes/uprobe.py): closing one
# link costs the kernel one RCU grace period (~0.05 s here) for all its sites, closing
# a perf-event uprobe one per site (~0.13 s, serialized). A test binary lives for
# milliseconds; its probes' removal must not dominate the run.
TL_COUNTERS = (
    "create_hits",
    "exit_hits",
    "trunner_hits",
    "live_table_full",
    "tests_table_full",
    "read_faults",
    "follow_table_full",
    "skipped_execs",
)


class CheckProbeError(GoleashError):
    """The BPF programs of `goleash check` could not be compiled or attached."""


class _Key(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("goid", ctypes.c_uint64)]


class _Path(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * PATH_LEN)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("goid", ctypes.c_uint64),
        ("ns", ctypes.c_uint64),
        ("path", _Path),
    ]


@dataclass(frozen=True)
class CheckEvent:
    kind: int  # FOLLOW_EXEC, FOLLOW_EXIT or PROCESS_EXIT
    pid: int
    goid: int = 0  # PROCESS_EXIT: the goroutine calling runtime.exit, 0 unknown
    ns: int = 0  # PROCESS_EXIT: when, CLOCK_MONOTONIC
    path: bytes = b""  # FOLLOW_EXEC: the path exec'd (b"" when longer than fits)


@dataclass(frozen=True)
class RunnerRecord:
    """One run of a test function (a tRunner goroutine), as the kernel recorded it."""

    goid: int
    fn_pc: int  # link-time
    parent_test: int  # goid of the parent test's runner, 0 for none
    start_ns: int
    end_ns: int  # 0: still running


@dataclass(frozen=True)
class Attribution:
    """What testleaks.bpf.c knows about one process."""

    goroutines: dict[int, tuple[int, int]]  # goid -> (test goid, created_ns)
    tests: dict[int, RunnerRecord]  # runner goid -> test run
    counters: dict[str, int]


class _Goroutine(ctypes.Structure):
    _fields_ = [("test_goid", ctypes.c_uint64), ("created_ns", ctypes.c_uint64)]


class _Test(ctypes.Structure):
    _fields_ = [
        ("fn_pc", ctypes.c_uint64),
        ("parent_test", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
    ]


class _Proc(ctypes.Structure):
    _fields_ = [
        ("g_goid", ctypes.c_uint32),
        ("g_parent_goid", ctypes.c_uint32),
        ("g_m", ctypes.c_uint32),
        ("m_curg", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("_pad1", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class CheckSites:
    """Where testleaks.bpf.c attaches in one executable."""

    goroutines: GoroutineProbeSites
    trunner: ProbeSite | None  # None: not a test binary
    process_exit: ProbeSite


class CheckProbes:
    """check.bpf.c: follows one process tree and attributes goroutines to tests in every
    Go process of it that is attached. `poll()` returns CheckEvents: FOLLOW_EXEC (the
    process is stopped), FOLLOW_EXIT, PROCESS_EXIT (stopped at runtime.exit)."""

    def __init__(self) -> None:
        cflags = [
            f"-I{BPF_DIR}",
            f"-DMAX_FOLLOWED={MAX_FOLLOWED}",
            f"-DMAX_PROCS={MAX_PROCS}",
            f"-DMAX_LIVE={MAX_LIVE}",
            f"-DMAX_TESTS={MAX_TESTS}",
            f"-DMAX_SKIP={MAX_SKIP}",
        ]
        # Compiled once per source, kernel and BCC; later runs load the cached program
        # (bpfimage.py): the compile was most of `goleash check`'s cost.
        try:
            self._bpf, self.origin = open_program("check", BPF_DIR / "check.bpf.c", cflags)
        except (GoleashError, OSError) as exc:
            raise CheckProbeError(f"loading check.bpf.c failed: {exc}") from exc
        b = self._bpf
        try:
            self._followed = b.map("followed", ctypes.c_uint32, ctypes.c_uint8)
            self._skip = b.map("chk_skip", _Path, ctypes.c_uint8)
            self._procs = b.map("tl_procs", ctypes.c_uint32, _Proc)
            self._goroutines = b.map("tl_goroutines", _Key, _Goroutine)
            self._tests = b.map("tl_tests", _Key, _Test)
            self._counters = b.map("tl_counters", ctypes.c_uint32, ctypes.c_uint64)
        except (GoleashError, KeyError) as exc:
            b.cleanup()
            raise CheckProbeError(f"check.bpf.c and testleaks.py disagree: {exc}") from exc
        self._events: list[CheckEvent] = []
        self._attached: dict[int, list[Callable[[], None]]] = {}  # pid -> its detaches
        self._multi: bool | None = None  # uprobe_multi links work here (None: not tried)
        self._lock = threading.Lock()

        def on_raw(_cpu: int, data: int, _size: int) -> None:
            ev = ctypes.cast(data, ctypes.POINTER(_Event)).contents
            self._events.append(
                CheckEvent(int(ev.kind), int(ev.pid), int(ev.goid), int(ev.ns), ev.path.name)
            )

        try:
            b.open_perf_buffer("chk_events", on_raw, page_cnt=64)
        except GoleashError as exc:
            b.cleanup()
            raise CheckProbeError(str(exc)) from exc

    def follow(self, pid: int) -> None:
        self._followed[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def skip(self, path: bytes) -> None:
        """Execs of PATH (absolute, as exec'd) go on without a stop or an event from now
        on: user space judged what it runs not to follow."""
        if not path.startswith(b"/") or len(path) >= PATH_LEN or b"\0" in path:
            return
        with contextlib.suppress(Exception):  # table full: they keep stopping, no harm
            self._skip[_Path(path)] = ctypes.c_uint8(1)

    def unfollow_all(self) -> list[int]:
        """Stop following anything: no process is stopped from now on. Returns the
        PIDs that were followed: any may sit stopped at an exec or exit whose event
        was not read yet."""
        was = [int(k.value) for k in self._followed]
        self._followed.clear()
        self._procs.clear()
        return was

    def poll(self, timeout_ms: int) -> list[CheckEvent]:
        self._bpf.perf_buffer_poll(timeout=timeout_ms)
        out, self._events = self._events, []
        return out

    def attach(self, pid: int, exe: str, offsets: RuntimeOffsets, sites: CheckSites) -> None:
        cfg = _Proc(
            offsets.g_goid,
            offsets.g_parent_goid or 0,
            offsets.g_m,
            offsets.m_curg,
            0,
            0,
        )
        self._procs[ctypes.c_uint32(pid)] = cfg
        on_create = "on_create_ax" if sites.goroutines.new_g_register == "rax" else "on_create_bx"
        groups: dict[str, list[ProbeSite]] = {on_create: list(sites.goroutines.create_sites)}
        groups["on_exit"] = [sites.goroutines.exit]
        groups["on_pexit"] = [sites.process_exit]
        if sites.trunner is not None:
            groups["on_trunner"] = [sites.trunner]
        done: list[Callable[[], None]] = []
        try:
            for fn, group in groups.items():
                if group:
                    done.append(self._attach_group(pid, exe, fn, group))
        except OSError as exc:
            with self._lock:
                self._detach_all(done)
            raise CheckProbeError(f"attaching to PID {pid}: {exc}") from exc
        self._attached[pid] = done

    def _attach_group(
        self, pid: int, exe: str, fn: str, group: list[ProbeSite]
    ) -> Callable[[], None]:
        """One link for the group (or a perf-event uprobe per site on kernels before
        6.6, learnt at the first process and kept for the others)."""
        attacher = GroupAttacher(self._bpf, exe, pid)
        attacher.multi = self._multi
        try:
            return attacher.attach([s.file_offset for s in group], fn)
        finally:
            self._multi = attacher.multi

    def detach(self, pid: int) -> None:
        """Remove the uprobes of one process. Each waits for the kernel (an RCU grace
        period per link or perf-event uprobe), so they go in parallel (the waits
        partly overlap) and callers run this off the event loop."""
        events = self._attached.pop(pid, [])
        with self._lock:
            self._detach_all(events)

    def _detach_all(self, detaches: list[Callable[[], None]]) -> None:
        def run(one: Callable[[], None]) -> None:
            with contextlib.suppress(Exception):  # already gone with its process
                one()

        if len(detaches) <= 1:
            for one in detaches:
                run(one)
            return
        with ThreadPoolExecutor(max_workers=min(8, len(detaches))) as pool:
            list(pool.map(run, detaches))

    def read(self, pid: int) -> Attribution:
        goroutines: dict[int, tuple[int, int]] = {}
        for k, v in self._goroutines.items():
            if k.pid == pid:
                goroutines[int(k.goid)] = (int(v.test_goid), int(v.created_ns))
        tests: dict[int, RunnerRecord] = {}
        for k, v in self._tests.items():
            if k.pid == pid:
                tests[int(k.goid)] = RunnerRecord(
                    int(k.goid), int(v.fn_pc), int(v.parent_test), int(v.start_ns), int(v.end_ns)
                )
        return Attribution(goroutines, tests, self.counters())

    def counters(self) -> dict[str, int]:
        counters = dict.fromkeys(TL_COUNTERS, 0)
        for idx, per_cpu in self._counters.items():
            if idx.value < len(TL_COUNTERS):
                counters[TL_COUNTERS[idx.value]] = sum(int(v) for v in per_cpu)
        return counters

    def forget(self, pid: int) -> None:
        """Drop what the maps hold for a process that is gone (bounded maps)."""
        for table in (self._goroutines, self._tests):
            for k in [k for k in table if k.pid == pid]:
                with contextlib.suppress(KeyError):
                    del table[k]

    def close(self, helper: ReleaseHelper | None = None) -> None:
        """Remove every probe. With a helper, the kernel's wait for that (grace periods,
        ~0.2 s here) is left to it: `goleash check` exits, and the CI job goes on."""
        release = helper.released_elsewhere() if helper else contextlib.nullcontext()
        with self._lock, release:
            left = [ev for evs in self._attached.values() for ev in evs]
            self._attached.clear()
            # Without the helper each costs a grace period; in parallel they overlap.
            bpf = self._bpf
            left += [functools.partial(bpf.detach_tracepoint, t) for t in list(bpf.tracepoint_fds)]
            self._detach_all(left)
            bpf.cleanup()
