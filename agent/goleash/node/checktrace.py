"""`goleash check`'s tracing side: judge each executable the command runs (once per
inode), attach check.bpf.c's probes to the Go programs among them, and at each
process's exit read its goroutines and name the ones its tests left behind."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError
from goleash.gobin.disasm import (
    disassemble,
)
from goleash.gobin.errors import BinaryError, ProcessError
from goleash.gobin.pclntab import Pclntab
from goleash.node import checksites
from goleash.node.checkjudge import STABLE_SKIPS, Judged, judge
from goleash.node.checkreport import (
    MAX_STACK_FRAMES,
    CheckReport,
    FollowedProcess,
    IgnoreList,
    Leak,
    split_symbol,
)
from goleash.probes.creation import site_at, started_functions
from goleash.probes.inventory import found_layout, read_goroutines, wait_reason_names
from goleash.probes.procmem import MemoryFault, ProcessMemory, load_bias, start_time
from goleash.probes.stacks import _frames as logical_frames
from goleash.probes.stacks import walk_stacks
from goleash.probes.target import GoProcess
from goleash.probes.testleaks import CheckEvent, CheckProbes, RunnerRecord

BLOCKED = ("waiting", "leaked", "syscall")
STOP_WAIT_S = 1.0
MAX_LEAKS_PER_PROCESS = 10_000
# Processes whose probes (3-4 links, as many fds) are removed together once gone.
DETACH_BATCH = 32
# runtime.main runs on the first goroutine created (goid 1, every release): it calls
# runtime.exit only once m.Run has returned (or TestMain exits), never mid-test.
MAIN_GOROUTINE = 1


# --- the run --------------------------------------------------------------------------------


@dataclass
class _Tracked:
    judged: Judged
    record: FollowedProcess
    start_time: int
    proc: GoProcess | None = None  # once prepared, after its exec stop

    def release(self) -> None:
        # Its memory only: the executable's analysis is the judged file's, shared by
        # every process of it (closed with the Checker).
        if self.proc is not None:
            self.proc.memory.close()


class Checker:
    def __init__(
        self, probes: CheckProbes, command: list[str], ignore: IgnoreList, baseline: set[Any]
    ) -> None:
        self.probes = probes
        self.command = command
        self.ignore = ignore
        self.baseline = baseline
        self.judged: dict[tuple[int, int, int, int], Judged] = {}
        self.tracked: dict[int, _Tracked] = {}
        self.processes: list[FollowedProcess] = []
        self.leaks: list[Leak] = []
        self.notes: list[str] = []
        self.execs = 0
        self._unprepared: list[int] = []
        self._gone: list[int] = []  # processes gone, their probes not yet removed
        self._detach_q: queue.Queue[int | None] = queue.Queue()
        self._closing = False
        self._detacher = threading.Thread(target=self._detach_loop, daemon=True)
        self._detacher.start()

    # Detaching a uprobe waits for the kernel (~120 ms each); never on the event loop.
    def _detach_loop(self) -> None:
        # SIGCHLD is for the main thread: it ends its wait for events (check.py).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while (pid := self._detach_q.get()) is not None:
            if not self._closing:  # else CheckProbes.close detaches them, in parallel
                self.probes.detach(pid)
                self.probes.forget(pid)

    def _judged(self, pid: int) -> Judged | None:
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            j = self.judged.get(key)
            if j is None:
                j = self.judged[key] = judge(fd)
                if not j.skip:
                    j.fd, fd = fd, -1  # kept: analysed from the same file once it runs
            return j
        finally:
            if fd >= 0:
                os.close(fd)

    def on_exec(self, pid: int, path: bytes = b"") -> None:
        """A followed process exec'd PATH and waits stopped: attach its probes (the
        caller resumes it, then calls `prepare`)."""
        self.execs += 1
        old = self.tracked.pop(pid, None)
        if old is not None:  # exec'd again: the old image's probes are gone with it
            self._detach_q.put(pid)
            old.release()
        exe = f"/proc/{pid}/exe"
        j = self._judged(pid)
        if j is None or j.skip:
            if j is not None and j.skip.startswith(STABLE_SKIPS):
                # Its next execs go on without a stop. The path, not the file: a path
                # replaced by a Go program during the run would go unchecked.
                self.probes.skip(path)
            return
        assert j.plan is not None and j.offsets is not None
        started = start_time(pid)
        record = FollowedProcess(
            pid, _exe_name(pid), j.plan.go_version, j.plan.sites.trunner is not None
        )
        self.processes.append(record)
        try:
            if started is None:
                raise ProcessError(f"PID {pid}: gone")
            self.probes.attach(pid, exe, j.offsets, j.plan.sites)
        except (GoleashError, BinaryError, OSError) as exc:
            record.note = f"not traced: {exc}"
            return
        self.tracked[pid] = _Tracked(j, record, started)
        self._unprepared.append(pid)

    def prepare(self) -> None:
        """What reading the goroutines of the processes attached since the last call
        needs, read while they run: their executable's analysis and their mappings."""
        while self._unprepared:
            self._prepare(self._unprepared.pop(0))

    def _prepare(self, pid: int) -> GoProcess | None:
        t = self.tracked.get(pid)
        if t is None or t.proc is not None:
            return t.proc if t else None
        try:
            a = t.judged.analyse()
            assert t.judged.offsets is not None
            t.proc = GoProcess(
                pid=pid,
                exe=f"/proc/{pid}/exe",
                exe_name=t.record.binary,
                binary=a.binary,
                build_info=a.info,
                offsets=t.judged.offsets,
                symbols=a.symbols,
                pclntab=a.pclntab,
                load_bias=load_bias(pid, a.binary),
                memory=ProcessMemory(pid),
                start_time=t.start_time,
            )
        except (GoleashError, BinaryError, OSError) as exc:
            t.record.note = f"not traced: {exc}"
            self.tracked.pop(pid, None)
            self._detach_q.put(pid)
            return None
        if not t.judged.warmed:
            t.judged.warmed = True
            _warm(t.proc, t.judged)
        return t.proc

    def on_process_exit(self, ev: CheckEvent) -> None:
        """runtime.exit stopped the process: read what is left, then let it go."""
        pid = ev.pid
        t = self.tracked.get(pid)
        try:
            if t is None:
                return
            _wait_stopped(pid, STOP_WAIT_S)
            proc = self._prepare(pid)  # when it exits before the loop got to it
            if proc is None:
                return
            try:
                self._collect(proc, t.record, ev)
            except (ProcessError, MemoryFault, BinaryError, GoleashError) as exc:
                t.record.note = f"goroutines at exit not read: {exc}"
                j = t.judged
                if j.plan is not None and j.plan.layout is not None and j.digest:
                    # Maybe a wrong layout kept from a run before: found afresh next time.
                    j.plan = replace(j.plan, layout=None)
                    checksites.store(j.digest, j.plan)
            else:
                self._remember(t.judged, proc)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _remember(self, j: Judged, proc: GoProcess) -> None:
        """Keep for later runs (its plan) where this binary's goroutines were found and
        the functions its `go f(x)` wrappers start."""
        if j.plan is None or not j.digest:
            return
        started = tuple(sorted(started_functions(proc.binary).items()))
        plan = j.plan
        if started != (plan.started or ()):
            plan = replace(plan, started=started[: checksites.MAX_STARTED])
        found = found_layout(proc.binary)
        if found is not None:
            # allgs alone (checked at first use) and the names: in a stripped binary
            # allglen/allgptr are told by the values they hold, which another word can
            # share by chance (seen: two runs, two answers). A stopped process's slice
            # header cannot tear, so check reads it directly.
            found = (found[0], None, None, found[3])
        if found is not None and found != plan.layout:
            plan = replace(plan, layout=found)
        if plan != j.plan:
            j.plan = plan
            checksites.store(j.digest, plan)

    def on_gone(self, pid: int) -> None:
        t = self.tracked.pop(pid, None)
        if t is not None:
            t.release()
            # Its probes are removed with the next batch, or with all the others at the
            # end (by the release helper, in no one's wall time): a removal still in
            # flight when `goleash check` exits holds its exit for a grace period.
            self._gone.append(pid)
            if len(self._gone) >= DETACH_BATCH:
                for p in self._gone:
                    self._detach_q.put(p)
                self._gone.clear()

    def _collect(self, proc: GoProcess, rec: FollowedProcess, ev: CheckEvent) -> None:
        inv = read_goroutines(proc)
        att = self.probes.read(proc.pid)
        rec.captured_at_exit = True
        rec.exit_goroutine = ev.goid
        rec.goroutines_at_exit = len(inv.goroutines)
        names = _test_names(att.tests, proc.pclntab)
        rec.tests = sorted({n[1].split("/")[0] for n in names.values()})
        rec.package = next((n[0] for n in names.values()), "")
        candidates = []
        for g in inv.goroutines:
            # Blocked, or created and never run: a goroutine its test is done with.
            # One that runs (or is runnable after running) may be on its way out, as
            # a worker stopped in t.Cleanup is right after it signalled "done".
            never_ran = g.status == "runnable" and g.sched_pc == g.startpc and not g.sched_bp
            if g.status not in BLOCKED and not never_ran:
                continue
            site = site_at(proc, g.gopc, g.startpc)
            if _internal(site.function, site.created_by):
                continue
            owner = att.goroutines.get(g.goid)
            pkg_test: tuple[str, str] = ("", "")
            ended_ns: int | None = None
            if owner is not None:
                run = att.tests.get(owner[0])
                if run is None or owner[0] not in names:
                    continue  # the harness's own runner
                ended_ns = end_of_test_at_exit(run, ev)
                if ended_ns is None:
                    continue  # its test is still running (os.Exit inside a test)
                pkg_test = names[owner[0]]
            elif g.status == "syscall" or never_ran:
                continue
            candidates.append((g, site, pkg_test, ended_ns))
            if len(candidates) >= MAX_LEAKS_PER_PROCESS:
                break
        stacks = walk_stacks(proc, [c[0] for c in candidates], MAX_STACK_FRAMES)
        groups: dict[tuple[str, str, str, str], Leak] = {}
        reasons: dict[tuple[str, str, str, str], Counter[str]] = {}
        for g, site, (pkg, test), ended_ns in candidates:
            stack = stacks[g.goid]
            frames = [f"{fr.function} {fr.file}:{fr.line}" for fr in stack.frames]
            function = started_function(proc, site.function, [fr.function for fr in stack.frames])
            if self.ignore.matches(function, site.go_statement, frames):
                continue
            key = (pkg, test, function, site.go_statement)
            blocked = (inv.read_ns - g.wait_since_ns) / 1e9 if g.wait_since_ns else None
            after = (inv.read_ns - ended_ns) / 1e9 if ended_ns is not None else None
            owner = att.goroutines.get(g.goid)
            age = (inv.read_ns - owner[1]) / 1e9 if owner and owner[1] else None
            lk = groups.get(key)
            if lk is None:
                lk = groups[key] = Leak(
                    package=pkg,
                    test=test,
                    binary=rec.binary,
                    function=function,
                    go_statement=site.go_statement,
                    created_by=site.created_by,
                    count=0,
                    wait_reason="",
                    blocked_s=None,
                    after_test_s=after,
                    stack=frames,
                    age_s=age,
                )
                reasons[key] = Counter()
            lk.count += 1
            reasons[key][
                g.wait_reason or ("never ran" if g.status == "runnable" else g.status)
            ] += 1
            if blocked is not None and (lk.blocked_s is None or blocked > lk.blocked_s):
                lk.blocked_s = blocked
            if age is not None and (lk.age_s is None or age > lk.age_s):
                lk.age_s = age
        for key, lk in groups.items():
            lk.wait_reason = reasons[key].most_common(1)[0][0]
            lk.known = lk.key in self.baseline
            self.leaks.append(lk)

    def report(self, exit_code: int | None, duration: float) -> CheckReport:
        return CheckReport(
            self.command, exit_code, duration, self.processes, self.leaks, self.notes, self.execs
        )

    def close(self) -> None:
        for pid in list(self.tracked):
            self.tracked.pop(pid).release()  # their probes go with the program
        for j in self.judged.values():
            j.close()
        self._closing = True
        self._detach_q.put(None)
        self._detacher.join()


def _warm(proc: GoProcess, j: Judged) -> None:
    """Read now, while the process runs, what the first read of a binary's goroutines
    at its exit stop would: in a stripped binary (`go test` links with -s -w) the
    runtime's goroutine list and wait reasons are found by function name (pclntab's
    name index, a disassembly) unless an earlier run kept them (its plan); every
    function lookup by PC needs the ABI wrappers; naming the function behind a
    `go f(x)` wrapper disassembles (capstone's first use imports it)."""
    with contextlib.suppress(GoleashError, BinaryError):
        if j.plan is not None and j.plan.started is not None:
            # Kept by an earlier run: its sites are read without a disassembler
            # (capstone's import alone costs ~25 ms). A name that would make a user's
            # goroutine the runtime's or testing's (never a leak) is found afresh,
            # never trusted; a wrapper of those packages starts none of the user's
            # (they import no user code), so its goroutine is theirs either way.
            known = started_functions(proc.binary)
            for wrapper, function in j.plan.started:
                if _trusted_start(wrapper, function):
                    known.setdefault(wrapper, function)
        if j.plan is not None and j.plan.layout is None:
            wait_reason_names(proc)
        site = j.plan.sites.process_exit if j.plan is not None else None
        if site is not None:
            proc.pclntab.func_for_pc(site.vaddr)
            if j.plan is None or j.plan.started is None:
                disassemble(proc.binary, site.vaddr, 16)


def end_of_test_at_exit(run: RunnerRecord, ev: CheckEvent) -> int | None:
    """When a test ended, as seen at its process's exit; None while it still runs.

    Its end is recorded when its tRunner goroutine exits, but tRunner releases its
    caller first: on a busy machine the main goroutine can run the remaining tests
    and exit while that goroutine has not reached goexit1. The main goroutine calls
    runtime.exit only after every test ended, so then an unrecorded end is the exit.
    Any other goroutine (os.Exit inside a test, a signal handler) may cut a test
    short: its goroutines are not leaks, the test never got to clean them up."""
    if run.end_ns:
        return run.end_ns
    if ev.goid == MAIN_GOROUTINE and ev.ns:
        return ev.ns
    return None


def started_function(proc: GoProcess, function: str, frames: list[str]) -> str:
    """The user's function behind a `go f(x)` wrapper (Go 1.21+ `caller.gowrapN`) when
    the compiler inlined f into the wrapper: from the stack, or, for a goroutine that
    never ran, from the wrapper's inline tree."""
    if ".gowrap" not in function:
        return function
    if function in frames:
        i = frames.index(function)
        if i > 0 and not frames[i - 1].startswith("runtime."):
            return frames[i - 1]
    return _inlined_callee(proc, function) or function


_callees: dict[tuple[int, str], str | None] = {}


def _inlined_callee(proc: GoProcess, function: str) -> str | None:
    key = (id(proc.binary), function)
    if key not in _callees:
        found = None
        f = proc.pclntab.func_by_name(function)
        if f is not None:
            for ins in disassemble(proc.binary, f.entry, min(f.end - f.entry, 4096)):
                inl = [fr for fr in logical_frames(proc, ins.address, True) if fr.inlined]
                names = [fr.function for fr in inl if not fr.function.startswith("runtime.")]
                if names:
                    found = names[-1]  # the outermost inlined call: f itself
                    break
        _callees[key] = found
    return _callees[key]


INTERNAL_PREFIXES = ("runtime.", "testing.", "internal/")


def _trusted_start(wrapper: str, function: str | None) -> bool:
    """Whether a kept (wrapper -> started function) may be used without checking: a
    wrong one must never turn a user's goroutine into one that is never a leak."""
    return (
        function is None
        or wrapper.startswith(INTERNAL_PREFIXES)
        or not function.startswith(INTERNAL_PREFIXES)
    )


def _internal(function: str, created_by: str) -> bool:
    """Goroutines of the runtime and of package testing are never leaks."""
    return (
        function.startswith(INTERNAL_PREFIXES)
        or created_by.startswith("testing.")
        or function == ""
    )


def _test_names(tests: dict[int, RunnerRecord], tab: Pclntab) -> dict[int, tuple[str, str]]:
    """runner goid -> (package, "TestFoo" or "TestFoo/func1"), harness runners left out."""
    out: dict[int, tuple[str, str]] = {}
    for goid, run in tests.items():
        chain: list[str] = []
        cur: RunnerRecord | None = run
        seen = 0
        while cur is not None and seen < 64:
            f = tab.func_for_pc(cur.fn_pc)
            name = f.name if f else f"{cur.fn_pc:#x}"
            if name.startswith("testing."):
                break
            chain.append(name)
            cur = tests.get(cur.parent_test) if cur.parent_test else None
            seen += 1
        if not chain:
            continue
        pkg, top = split_symbol(chain[-1])
        parts = [top]
        for sub in reversed(chain[:-1]):
            _, rest = split_symbol(sub)
            parts.append(rest[len(top) + 1 :] if rest.startswith(top + ".") else rest)
        out[goid] = (pkg, "/".join(parts))
    return out


def _wait_stopped(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        if state in ("T", "t"):
            return True
        time.sleep(0.001)
    return False


def _exe_name(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return f"/proc/{pid}/exe"
