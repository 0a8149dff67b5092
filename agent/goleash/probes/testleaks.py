"""BCC side of `goleash check`: follow a command's process tree (follow.bpf.c) and
attribute goroutines to the tests that created them (testleaks.bpf.c).

One testleaks program serves every followed process built by the same Go release
(its maps are keyed by pid), so BCC compiles it once per release, not once per test
binary. Both programs stop a process (SIGSTOP from BPF) at the moments user space
must act before the process runs on: right after exec (to attach probes before the
first Go instruction) and at runtime.exit (to read the goroutines still blocked
before they vanish). The caller always sends the SIGCONT.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

from goleash.errors import GoleashError
from goleash.gobin.disasm import GoroutineProbeSites, ProbeSite
from goleash.gobin.offsets import RuntimeOffsets
from goleash.probes.uprobe import attach_at, detach

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
MAX_FOLLOWED = 65536
MAX_LIVE = 65536
MAX_TESTS = 16384
MAX_SPAN = 256
FOLLOW_EXEC, FOLLOW_EXIT = 1, 2
TL_COUNTERS = (
    "create_hits",
    "exit_hits",
    "trunner_hits",
    "live_table_full",
    "tests_table_full",
    "read_faults",
)


class CheckProbeError(GoleashError):
    """The BPF programs of `goleash check` could not be compiled or attached."""


class _Key(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("goid", ctypes.c_uint64)]


class _Event(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("kind", ctypes.c_uint32)]


@dataclass(frozen=True)
class TestRun:
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
    tests: dict[int, TestRun]  # runner goid -> test run
    counters: dict[str, int]


def _compile(src: str, cflags: list[str]) -> object:
    from bcc import BPF  # the only package that imports bcc

    try:
        return BPF(text=src.encode(), cflags=cflags)
    except Exception as exc:  # BCC raises bare Exception on compile errors
        raise CheckProbeError(f"compiling a goleash check BPF program failed: {exc}") from exc


class ProcessFollower:
    """Follows one process tree: every fork of a followed process is followed, every
    exec of one stops it and is reported to `on_event(kind, pid)`."""

    def __init__(self) -> None:
        src = (BPF_DIR / "follow.bpf.c").read_text()
        self._bpf = _compile(src, [f"-DMAX_FOLLOWED={MAX_FOLLOWED}"])
        self._events: list[tuple[int, int]] = []

        def on_raw(_cpu: int, data: int, _size: int) -> None:
            ev = ctypes.cast(data, ctypes.POINTER(_Event)).contents
            self._events.append((int(ev.kind), int(ev.pid)))

        self._bpf["follow_events"].open_perf_buffer(on_raw, page_cnt=64)  # type: ignore[index]

    def follow(self, pid: int) -> None:
        self._bpf["followed"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)  # type: ignore[index]

    def poll(self, timeout_ms: int) -> list[tuple[int, int]]:
        self._bpf.perf_buffer_poll(timeout=timeout_ms)  # type: ignore[attr-defined]
        out, self._events = self._events, []
        return out

    @property
    def table_full(self) -> int:
        return int(self._bpf["follow_full"][0].value)  # type: ignore[index]

    def close(self) -> None:
        self._bpf.cleanup()  # type: ignore[attr-defined]


def program_key(offsets: RuntimeOffsets, sites: GoroutineProbeSites) -> tuple[object, ...]:
    """Processes with equal keys share one compiled testleaks program."""
    return (
        offsets.g_goid,
        offsets.g_parent_goid,
        offsets.g_m,
        offsets.m_curg,
        sites.new_g_register,
    )


def _cflags(offsets: RuntimeOffsets, sites: GoroutineProbeSites) -> list[str]:
    flags = [
        f"-I{BPF_DIR}",
        f"-DG_GOID={offsets.g_goid}",
        f"-DG_M={offsets.g_m}",
        f"-DM_CURG={offsets.m_curg}",
        f"-DMAX_LIVE={MAX_LIVE}",
        f"-DMAX_TESTS={MAX_TESTS}",
        "-DCREATE_REG=" + ("bx" if sites.new_g_register == "rbx" else "ax"),
    ]
    span = [offsets.g_goid]
    if offsets.g_parent_goid is not None:
        flags.append(f"-DG_PARENT_GOID={offsets.g_parent_goid}")
        span.append(offsets.g_parent_goid)
    lo, hi = min(span), max(span) + 8
    if hi - lo > MAX_SPAN:
        raise CheckProbeError(
            f"runtime.g fields goid/parentGoid span {hi - lo} bytes: this Go release's "
            "layout needs a probe update"
        )
    return [*flags, f"-DSPAN_START={lo}", f"-DSPAN_WORDS={(hi - lo) // 8}"]


@dataclass(frozen=True)
class CheckSites:
    """Where testleaks.bpf.c attaches in one executable."""

    goroutines: GoroutineProbeSites
    trunner: ProbeSite | None  # None: not a test binary
    process_exit: ProbeSite


class TestLeakProbes:
    """testleaks.bpf.c for one Go release, attached to any number of processes."""

    def __init__(self, offsets: RuntimeOffsets, sites: GoroutineProbeSites) -> None:
        src = (BPF_DIR / "testleaks.bpf.c").read_text()
        self._bpf = _compile(src, _cflags(offsets, sites))
        self._attached: dict[int, list[str]] = {}
        self._exits: list[int] = []
        self._lock = threading.Lock()

        def on_raw(_cpu: int, data: int, _size: int) -> None:
            ev = ctypes.cast(data, ctypes.POINTER(_Event)).contents
            self._exits.append(int(ev.pid))

        self._bpf["tl_exits"].open_perf_buffer(on_raw, page_cnt=16)  # type: ignore[index]

    def attach(self, pid: int, exe: str, sites: CheckSites) -> None:
        plan = [(s, "on_create") for s in sites.goroutines.create_sites]
        plan.append((sites.goroutines.exit, "on_exit"))
        plan.append((sites.process_exit, "on_pexit"))
        if sites.trunner is not None:
            plan.append((sites.trunner, "on_trunner"))
        events: list[str] = []
        try:
            for site, fn in plan:
                events.append(attach_at(self._bpf, exe, site.file_offset, fn, pid))
        except OSError as exc:
            with self._lock:
                for ev in events:
                    detach(self._bpf, ev)
            raise CheckProbeError(f"attaching to PID {pid}: {exc}") from exc
        self._attached[pid] = events

    def detach(self, pid: int) -> None:
        """Remove the uprobes of one process. Slow (~120 ms per perf-event uprobe on
        recent kernels): callers run it off the event loop."""
        events = self._attached.pop(pid, [])
        with self._lock:
            for ev in events:
                detach(self._bpf, ev)

    def poll_exits(self) -> list[int]:
        self._bpf.perf_buffer_poll(timeout=0)  # type: ignore[attr-defined]
        out, self._exits = self._exits, []
        return out

    def read(self, pid: int) -> Attribution:
        goroutines: dict[int, tuple[int, int]] = {}
        for k, v in self._bpf["tl_goroutines"].items():  # type: ignore[index]
            if k.pid == pid:
                goroutines[int(k.goid)] = (int(v.test_goid), int(v.created_ns))
        tests: dict[int, TestRun] = {}
        for k, v in self._bpf["tl_tests"].items():  # type: ignore[index]
            if k.pid == pid:
                tests[int(k.goid)] = TestRun(
                    int(k.goid), int(v.fn_pc), int(v.parent_test), int(v.start_ns), int(v.end_ns)
                )
        counters = dict.fromkeys(TL_COUNTERS, 0)
        for idx, per_cpu in self._bpf["tl_counters"].items():  # type: ignore[index]
            if idx.value < len(TL_COUNTERS):
                counters[TL_COUNTERS[idx.value]] = sum(int(v) for v in per_cpu)
        return Attribution(goroutines, tests, counters)

    def forget(self, pid: int) -> None:
        """Drop what the maps hold for a process that is gone (bounded maps)."""
        for name in ("tl_goroutines", "tl_tests"):
            table = self._bpf[name]  # type: ignore[index]
            for k in [k for k in table if k.pid == pid]:
                with contextlib.suppress(KeyError):
                    del table[k]

    def close(self) -> None:
        with self._lock:
            self._bpf.cleanup()  # type: ignore[attr-defined]


