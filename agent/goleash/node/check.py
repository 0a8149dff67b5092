"""`goleash check -- CMD ...`: run a command and fail when Go programs it starts leak
goroutines.

How it works (no change to the command or its tests):

1. follow.bpf.c follows CMD's process tree. Every exec in it is stopped (SIGSTOP from
   BPF) before its first instruction; the new executable is judged here: not Go, or
   part of the Go toolchain (build info path `cmd/...`: go, compile, link, vet, ...),
   and it continues at once; a Go program gets testleaks.bpf.c attached first.
2. testleaks.bpf.c marks each test's goroutine (testing.tRunner) and gives every
   goroutine created from it, transitively, that test; a test ends when its runner
   goroutine exits, after its t.Cleanup functions.
3. At runtime.exit (os.Exit or main returning) the process is stopped again, its
   goroutines are read from memory, and every goroutine still blocked whose test has
   ended (or that no test created) is a leak, reported with its creation site and
   stack. Then it continues.

Goroutines of the runtime and of package testing, and anything on the ignore list,
are never leaks.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError
from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import BuildInfo, check_supported, read_build_info
from goleash.gobin.disasm import (
    CreateKind,
    GoroutineProbeSites,
    ProbeSite,
    SymbolLookup,
    call_sites,
    disassemble,
    emulated_entry_site,
    entry_site,
    return_sites,
)
from goleash.gobin.errors import BinaryError, ProcessError, SymbolNotFoundError
from goleash.gobin.offsets import RuntimeOffsets, table_offsets
from goleash.gobin.pclntab import Pclntab
from goleash.gobin.symbols import symbol_table
from goleash.probes.inventory import read_goroutines, site_at
from goleash.probes.procmem import MemoryFault, ProcessMemory, load_bias, start_time
from goleash.probes.stacks import _frames as logical_frames
from goleash.probes.stacks import walk_stacks
from goleash.probes.target import GoProcess
from goleash.probes.testleaks import (
    FOLLOW_EXEC,
    FOLLOW_EXIT,
    PROCESS_EXIT,
    CheckEvent,
    CheckProbeError,
    CheckProbes,
    CheckSites,
    RunnerRecord,
)

BLOCKED = ("waiting", "leaked", "syscall")
STOP_WAIT_S = 1.0
MAX_LEAKS_PER_PROCESS = 10_000
MAX_STACK_FRAMES = 32
# runtime.main runs on the first goroutine created (goid 1, every release): it calls
# runtime.exit only once m.Run has returned (or TestMain exits), never mid-test.
MAIN_GOROUTINE = 1


class CheckUsageError(GoleashError):
    """Bad arguments or ignore/baseline files for `goleash check`."""


# --- what the user gets --------------------------------------------------------------


@dataclass
class Leak:
    """Goroutines of one creation site left blocked by one test (or at one exit)."""

    package: str  # Go package of the test ("" for an exit leak outside any test)
    test: str  # "TestFoo", "TestFoo/func1" (a subtest, named by its function); "" none
    binary: str  # the executable, as the process saw it
    function: str  # the function the goroutine started with
    go_statement: str  # file:line of the `go` statement
    created_by: str  # function holding the `go` statement
    count: int
    wait_reason: str  # the most common among them
    blocked_s: float | None  # longest known wait (runtime's lazy g.waitsince)
    after_test_s: float | None  # how long after its test ended it was still there
    stack: list[str]  # one goroutine's frames, "function file:line"
    age_s: float | None = None  # oldest of them, since its creation
    known: bool = False  # in the --baseline report: does not fail the check

    @property
    def key(self) -> tuple[str, str, str, str]:
        # Line-free so a baseline survives edits above the go statement.
        return (self.package, self.test, self.function, self.created_by)

    def headline(self) -> str:
        who = f"{self.test} leaked" if self.test else "at exit, outside any test:"
        n = f"{self.count} goroutine" + ("s" if self.count != 1 else "")
        site = (
            Path(self.go_statement.split(":")[0]).name + ":" + self.go_statement.rsplit(":", 1)[-1]
        )
        text = f"{who} {n} created at {site} ({_short(self.function)})"
        if self.wait_reason == "never ran":
            text += ", never scheduled before the process exited"
        elif self.wait_reason:
            text += f", blocked in {self.wait_reason}"
            if self.blocked_s is not None:
                text += f" for {self.blocked_s:.1f} s"
        details = []
        if self.age_s is not None:
            details.append(f"alive {self.age_s:.2f} s")
        if self.after_test_s is not None:
            details.append(f"{self.after_test_s:.2f} s after its test ended")
        if details:
            text += f" ({', '.join(details)})"
        return text


@dataclass
class FollowedProcess:
    pid: int
    binary: str
    go_version: str
    test_binary: bool
    tests: list[str] = field(default_factory=list)  # top-level tests that ran
    package: str = ""
    captured_at_exit: bool = False
    goroutines_at_exit: int = 0
    exit_goroutine: int = 0  # the goid that called runtime.exit; 0 unknown
    note: str = ""


@dataclass
class CheckReport:
    command: list[str]
    exit_code: int | None  # the command's; None when it could not be started
    duration_s: float
    processes: list[FollowedProcess]
    leaks: list[Leak]
    notes: list[str]
    execs_seen: int = 0

    @property
    def failing(self) -> list[Leak]:
        return [lk for lk in self.leaks if not lk.known]

    def exit_status(self) -> int:
        """The command's own failure wins (returned as is); else 1 on new leaks."""
        if self.exit_code:
            return self.exit_code
        return 1 if self.failing else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "command_exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 3),
            "clean": not self.failing,
            "leaks": [asdict(lk) for lk in self.leaks],
            "processes": [asdict(p) for p in self.processes],
            "notes": self.notes,
            "execs_seen": self.execs_seen,
        }


def _short(function: str) -> str:
    """example.com/x/store.(*S).watch -> store.(*S).watch"""
    return function.rsplit("/", 1)[-1]


def split_symbol(name: str) -> tuple[str, str]:
    """("example.com/x/store", "TestFoo.func1") from a Go symbol."""
    head, slash, tail = name.rpartition("/")
    pkg, _, rest = tail.partition(".")
    return (head + slash + pkg, rest)


# --- ignore list and baseline ------------------------------------------------------------


@dataclass
class IgnoreList:
    """Like goleak's options: a top function, a `go` statement or a started function."""

    top: set[str] = field(default_factory=set)
    sites: set[str] = field(default_factory=set)  # "file.go:42" (suffix of the path)
    functions: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: str) -> IgnoreList:
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise CheckUsageError(f"cannot read ignore file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CheckUsageError(f"{path}: not YAML: {exc}") from None
        entries = doc.get("ignore") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise CheckUsageError(
                f"{path}: expected `ignore:` with a list of {{top: FUNC}}, {{site: FILE:LINE}} "
                "or {function: FUNC}"
            )
        out = cls()
        for e in entries:
            if not isinstance(e, dict) or len(e) != 1:
                raise CheckUsageError(f"{path}: bad ignore entry {e!r}")
            ((kind, value),) = e.items()
            if not isinstance(value, str) or not value:
                raise CheckUsageError(f"{path}: bad ignore entry {e!r}")
            if kind == "top":
                out.top.add(value)
            elif kind == "site":
                out.sites.add(value)
            elif kind == "function":
                out.functions.add(value)
            else:
                raise CheckUsageError(f"{path}: unknown ignore kind {kind!r} (top, site, function)")
        return out

    def matches(self, function: str, go_statement: str, stack: list[str]) -> bool:
        if function in self.functions:
            return True
        if any(go_statement == s or go_statement.endswith("/" + s) for s in self.sites):
            return True
        top = next((f.split(" ")[0] for f in stack if not f.startswith("runtime.")), None)
        return top is not None and top in self.top


def load_baseline(path: str) -> set[tuple[str, str, str, str]]:
    import json

    try:
        doc = json.loads(Path(path).read_text())
        return {
            (lk["package"], lk["test"], lk["function"], lk["created_by"]) for lk in doc["leaks"]
        }
    except OSError as exc:
        raise CheckUsageError(f"cannot read baseline {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckUsageError(
            f"{path}: not a `goleash check --json` report (no leaks list)"
        ) from None


# --- one executable, analysed once per inode ----------------------------------------------


@dataclass
class _Judged:
    skip: str  # why it is not traced ("" when it is)
    binary: GoBinary | None = None
    info: BuildInfo | None = None
    offsets: RuntimeOffsets | None = None
    pclntab: Pclntab | None = None
    sites: CheckSites | None = None


def _judge(path: str) -> _Judged:
    try:
        binary = GoBinary(path)
        info = read_build_info(binary)
    except BinaryError:
        return _Judged("not a Go program")
    if (info.main_package or "").startswith("cmd/"):
        return _Judged(f"Go toolchain ({info.main_package})")
    try:
        check_supported(info)
        offsets = table_offsets(info.go_version)
        tab = Pclntab.from_binary(binary)
        lookup = symbol_table(binary).lookup
        sites = _check_sites(binary, lookup)
    except (BinaryError, GoleashError) as exc:
        return _Judged(f"cannot trace: {exc}")
    return _Judged("", binary, info, offsets, tab, sites)


def _check_sites(binary: GoBinary, lookup: SymbolLookup) -> CheckSites:
    """The four sites check.bpf.c needs, and only those: a test binary is analysed
    while it waits stopped at its first instruction, so every millisecond counts."""

    def need(name: str) -> tuple[int, int]:
        found = lookup(name)
        if found is None:
            raise SymbolNotFoundError(f"{binary.path}: no {name}")
        return found

    create: list[ProbeSite] = []
    closure, runqput = lookup("runtime.newproc.func1"), lookup("runtime.runqput")
    if closure is not None and runqput is not None:
        calls = call_sites(binary, "runtime.newproc.func1", *closure, target=runqput[0])
        if len(calls) == 1:
            create = calls
    kind: CreateKind = "runqput_call" if create else "newproc1_ret"
    rets: list[ProbeSite] = []
    if not create:
        rets = return_sites(binary, "runtime.newproc1", *need("runtime.newproc1"))
    exit_site = emulated_entry_site(binary, "runtime.goexit1", *need("runtime.goexit1"))
    gsites = GoroutineProbeSites(
        create_kind=kind,
        create=create[0] if create else None,
        create_rets=rets,
        exit=exit_site,
        newproc_entry=exit_site,  # not used by check.bpf.c
        gopark=exit_site,  # not used
        gopanic=exit_site,  # not used
    )
    tr = lookup("testing.tRunner")
    trunner = (
        emulated_entry_site(binary, "testing.tRunner", *tr, keep=("r14", "rbx")) if tr else None
    )
    pexit = entry_site(binary, "runtime.exit", *need("runtime.exit"))
    return CheckSites(gsites, trunner, pexit)


# --- the run --------------------------------------------------------------------------------


@dataclass
class _Tracked:
    proc: GoProcess
    judged: _Judged
    record: FollowedProcess


class _Checker:
    def __init__(
        self, probes: CheckProbes, command: list[str], ignore: IgnoreList, baseline: set[Any]
    ) -> None:
        self.probes = probes
        self.command = command
        self.ignore = ignore
        self.baseline = baseline
        self.judged: dict[tuple[int, int, int, int], _Judged] = {}
        self.tracked: dict[int, _Tracked] = {}
        self.processes: list[FollowedProcess] = []
        self.leaks: list[Leak] = []
        self.notes: list[str] = []
        self.execs = 0
        self._detach_q: queue.Queue[int | None] = queue.Queue()
        self._detacher = threading.Thread(target=self._detach_loop, daemon=True)
        self._detacher.start()

    # Detaching a uprobe waits for the kernel (~120 ms each); never on the event loop.
    def _detach_loop(self) -> None:
        while (pid := self._detach_q.get()) is not None:
            self.probes.detach(pid)
            self.probes.forget(pid)

    def on_exec(self, pid: int) -> None:
        self.execs += 1
        old = self.tracked.pop(pid, None)
        if old is not None:  # exec'd again: the old image's probes are gone with it
            self._detach_q.put(pid)
        try:
            exe = f"/proc/{pid}/exe"
            st = os.stat(exe)
        except OSError:
            return
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        j = self.judged.get(key)
        if j is None:
            j = self.judged[key] = _judge(exe)
        if j.skip:
            return
        assert j.binary and j.info and j.offsets and j.pclntab and j.sites
        name = _exe_name(pid)
        started = start_time(pid)
        record = FollowedProcess(pid, name, j.info.go_version, j.sites.trunner is not None)
        try:
            proc = GoProcess(
                pid=pid,
                exe=exe,
                exe_name=name,
                binary=j.binary,
                build_info=j.info,
                offsets=j.offsets,
                symbols=symbol_table(j.binary),
                pclntab=j.pclntab,
                load_bias=load_bias(pid, j.binary),
                memory=ProcessMemory(pid),
                start_time=started or 0,
            )
            self.probes.attach(pid, exe, j.offsets, j.sites)
        except (GoleashError, BinaryError, OSError) as exc:
            record.note = f"not traced: {exc}"
            self.processes.append(record)
            return
        self.processes.append(record)
        self.tracked[pid] = _Tracked(proc, j, record)

    def on_process_exit(self, ev: CheckEvent) -> None:
        """runtime.exit stopped the process: read what is left, then let it go."""
        pid = ev.pid
        t = self.tracked.get(pid)
        try:
            if t is None:
                return
            _wait_stopped(pid, STOP_WAIT_S)
            try:
                self._collect(t, ev)
            except (ProcessError, MemoryFault, BinaryError, GoleashError) as exc:
                t.record.note = f"goroutines at exit not read: {exc}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def on_gone(self, pid: int) -> None:
        t = self.tracked.pop(pid, None)
        if t is not None:
            t.proc.close()
            self._detach_q.put(pid)

    def _collect(self, t: _Tracked, ev: CheckEvent) -> None:
        proc, rec = t.proc, t.record
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
            self.tracked.pop(pid).proc.close()  # their probes go with the program
        self._detach_q.put(None)
        self._detacher.join()


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


def _internal(function: str, created_by: str) -> bool:
    """Goroutines of the runtime and of package testing are never leaks."""
    return (
        function.startswith(("runtime.", "testing.", "internal/"))
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


def _spawn_held(command: list[str], *, stdout_to_stderr: bool) -> tuple[int, int]:
    """Fork CMD held before exec until the follower knows its pid: (pid, release fd).
    With `stdout_to_stderr` CMD writes to goleash's stderr, leaving stdout to the
    report (--json stays parseable)."""
    if shutil.which(command[0]) is None:
        raise CheckUsageError(f"command not found: {command[0]}")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(w)
            if stdout_to_stderr:
                os.dup2(2, 1)
            os.read(r, 1)
            os.close(r)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(2, f"goleash check: cannot run {command[0]}: {exc}\n".encode())
        os._exit(127)
    os.close(r)
    return pid, w


def run_check(
    command: list[str],
    *,
    ignore: IgnoreList | None = None,
    baseline: set[Any] | None = None,
    poll_ms: int = 20,
    stdout_to_stderr: bool = False,
) -> CheckReport:
    if not command:
        raise CheckUsageError("nothing to run: give the command after `--`")
    started = time.monotonic()
    try:
        probes = CheckProbes()
    except CheckProbeError as exc:
        raise GoleashError(f"{exc} (goleash check needs root and BPF)") from None
    checker = _Checker(probes, command, ignore or IgnoreList(), baseline or set())
    pid, release = _spawn_held(command, stdout_to_stderr=stdout_to_stderr)
    exit_code: int | None = None
    forwarded = {}

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        forwarded[s] = signal.signal(s, forward)
    try:
        probes.follow(pid)
        os.write(release, b"x")
        os.close(release)
        done_at: float | None = None
        while True:
            for ev in probes.poll(poll_ms):
                try:
                    if ev.kind == FOLLOW_EXEC:
                        checker.on_exec(ev.pid)
                    elif ev.kind == PROCESS_EXIT:
                        checker.on_process_exit(ev)
                    elif ev.kind == FOLLOW_EXIT:
                        checker.on_gone(ev.pid)
                except Exception as exc:  # one process's failure never stops the check
                    checker.notes.append(f"PID {ev.pid}: {type(exc).__name__}: {exc}")
                finally:
                    if ev.kind in (FOLLOW_EXEC, PROCESS_EXIT):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(ev.pid, signal.SIGCONT)
            if exit_code is None:
                wpid, status = os.waitpid(pid, os.WNOHANG)
                if wpid == pid:
                    exit_code = os.waitstatus_to_exitcode(status)
                    if exit_code < 0:
                        exit_code = 128 - exit_code
                    done_at = time.monotonic()
            elif done_at is not None and time.monotonic() - done_at > 0.1:
                break  # events of the last exits drained
        full = probes.counters()["follow_table_full"]
        if full:
            checker.notes.append(f"{full} processes were not followed (follow table full)")
    finally:
        # Processes that exec'd or exited after the command did (daemons it left) may
        # be stopped with their events unread: stop following, then resume them.
        with contextlib.suppress(Exception):
            probes.unfollow_all()
            for ev in probes.poll(0):
                if ev.kind in (FOLLOW_EXEC, PROCESS_EXIT):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(ev.pid, signal.SIGCONT)
        for s, h in forwarded.items():
            signal.signal(s, h)
        checker.close()
        probes.close()
    report = checker.report(exit_code, time.monotonic() - started)
    if not report.processes:
        report.notes.append(
            "no Go program ran under the command (test results cached? add -count=1)"
        )
    return report


# --- rendering ------------------------------------------------------------------------------


def render_text(rep: CheckReport) -> str:
    lines: list[str] = []
    by_test: dict[tuple[str, str], list[Leak]] = {}
    for lk in rep.leaks:
        by_test.setdefault((lk.package, lk.test), []).append(lk)
    for (pkg, test), leaks in sorted(by_test.items()):
        known = all(lk.known for lk in leaks)
        label = "KNOWN" if known else "LEAK"
        lines.append(f"{label} {pkg or leaks[0].binary} {test or '(at exit, outside any test)'}")
        for lk in sorted(leaks, key=lambda x: (x.go_statement, x.function)):
            lines.append(f"  {lk.headline()}" + ("  [in baseline]" if lk.known else ""))
            for fr in lk.stack[:MAX_STACK_FRAMES]:
                fn, _, where = fr.partition(" ")
                lines.append(f"      {fn}")
                lines.append(f"          {where}")
            lines.append(f"      created by {lk.created_by} at {lk.go_statement}")
    traced = [p for p in rep.processes if not p.note]
    tests = sum(len(p.tests) for p in traced)
    n_leaks = sum(lk.count for lk in rep.failing)
    leaking_tests = len({(lk.package, lk.test) for lk in rep.failing})
    lines.append(
        f"goleash check: {' '.join(rep.command)} exited {rep.exit_code} after "
        f"{rep.duration_s:.1f}s; {len(traced)} Go processes followed, {tests} tests seen"
    )
    if rep.failing:
        lines.append(
            f"FAIL: {n_leaks} leaked goroutines from {leaking_tests} tests or exits, "
            f"{len({(lk.function, lk.go_statement) for lk in rep.failing})} creation sites"
        )
    else:
        lines.append("ok: no goroutine leaks")
    for p in rep.processes:
        if p.note:
            lines.append(f"note: PID {p.pid} {p.binary}: {p.note}")
        elif p.test_binary and p.go_version and _old_go(p.go_version):
            lines.append(
                f"note: PID {p.pid} {p.binary} ({p.go_version}): no g.parentGoid before Go 1.21;"
                " creators are read from the creating thread's current goroutine instead"
            )
    lines.extend(f"note: {n}" for n in rep.notes)
    return "\n".join(lines) + "\n"


def _old_go(version: str) -> bool:
    from goleash.gobin.buildinfo import parse_go_version

    return parse_go_version(version) < (1, 21, 0)


def write_junit(rep: CheckReport, path: str) -> None:
    """One testsuite per Go package; each test seen is a testcase, failed if it leaked."""
    import xml.etree.ElementTree as ET

    suites: dict[str, dict[str, list[Leak]]] = {}
    for p in rep.processes:
        for t in p.tests:
            suites.setdefault(p.package or p.binary, {}).setdefault(t, [])
    for lk in rep.failing:
        pkg = lk.package or lk.binary
        name = lk.test.split("/")[0] if lk.test else "goroutines blocked at exit"
        suites.setdefault(pkg, {}).setdefault(name, []).append(lk)
    root = ET.Element("testsuites", name="goleash check")
    total_fail = 0
    for pkg, cases in sorted(suites.items()):
        fails = sum(1 for v in cases.values() if v)
        total_fail += fails
        suite = ET.SubElement(
            root, "testsuite", name=pkg, tests=str(len(cases)), failures=str(fails), errors="0"
        )
        for name, leaks in sorted(cases.items()):
            case = ET.SubElement(suite, "testcase", classname=pkg, name=name)
            if leaks:
                msg = "; ".join(lk.headline() for lk in leaks)
                fail = ET.SubElement(case, "failure", message=msg, type="goroutine leak")
                fail.text = "\n\n".join(
                    lk.headline() + "\n" + "\n".join("  " + f for f in lk.stack) for lk in leaks
                )
    root.set("failures", str(total_fail))
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def print_report(rep: CheckReport, *, as_json: bool) -> None:
    if as_json:
        import json

        json.dump(rep.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(rep))
