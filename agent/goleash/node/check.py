"""`goleash check -- CMD ...`: run a command and fail when Go programs it starts leak
goroutines.

How it works (no change to the command or its tests):

0. BCC compiles bpf/check.bpf.c (seconds) in a thread while CMD starts: `go test` and
   `go run` at once, with every program they run passing a gate (their -exec) that
   waits until the probes follow CMD's tree; any other CMD is held before its exec.
1. check.bpf.c follows CMD's process tree. Every exec in it is stopped (SIGSTOP from
   BPF) before its first instruction; the new executable is judged (checktrace.py):
   not Go, or part of the Go toolchain (build info path `cmd/...`: go, compile, link,
   vet, ...), and it continues at once (its path's next execs are not even stopped);
   a Go program gets its probes attached first
   (the sites from a cache keyed by the file's content when an earlier run analysed
   the same bytes: checksites.py), and what reading it at exit needs is read once it
   runs again.
2. The probes mark each test's goroutine (testing.tRunner) and give every goroutine
   created from it, transitively, that test; a test ends when its runner goroutine
   exits, after its t.Cleanup functions (or when the main goroutine exits the process).
3. At runtime.exit (os.Exit or main returning) the process is stopped again, its
   goroutines are read from memory, and every goroutine still blocked whose test has
   ended (or that no test created) is a leak, reported with its creation site and
   stack (checkreport.py). Then it continues.

Goroutines of the runtime and of package testing, and anything on the ignore list,
are never leaks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError
from goleash.node.checkreport import (  # noqa: F401  (the report model, re-exported)
    CheckReport,
    CheckUsageError,
    FollowedProcess,
    IgnoreList,
    Leak,
    load_baseline,
    print_report,
    render_text,
    split_symbol,
    write_junit,
)

# --- starting the command while the probes load ---------------------------------------------
#
# BCC compiles check.bpf.c at run time: seconds, mostly clang's fixed cost. The command
# must not run a program to check before the probes follow it, but it need not wait
# for them to start: `go test` and `go run` spend their first seconds building, and
# run what they built through `-exec`. So for those, the command starts at once and
# every program it would run goes through a gate that waits until the probes are
# loaded and follow the command's tree; any other command is held before its exec.

GATE_GO_SUBCOMMANDS = ("test", "run")  # the ones that honour -exec
GATE_SCRIPT = """#!/bin/sh
# goleash check: wait until goleash follows this process, then run what go would run;
# never run it unfollowed (goleash gave up or is gone).
[ -p "$GOLEASH_CHECK_GATE" ] && : < "$GOLEASH_CHECK_GATE"
if [ ! -e "$GOLEASH_CHECK_GATE.go" ]; then
    echo "goleash check: $1 not run: goleash stopped before it could follow it" >&2
    exit 125
fi
if [ -n "${GOLEASH_CHECK_GOFLAGS+set}" ]; then
    GOFLAGS=$GOLEASH_CHECK_GOFLAGS
    export GOFLAGS
else
    unset GOFLAGS
fi
unset GOLEASH_CHECK_GATE GOLEASH_CHECK_GOFLAGS
exec "$@"
"""


@dataclass
class ExecGate:
    """`go test`/`go run` with GOFLAGS=-exec=GATE: each program go runs waits at GATE
    until `open()`; the user's GOFLAGS come back before it runs."""

    script: Path
    fifo: Path
    _held: int | None = None

    @classmethod
    def for_command(cls, command: list[str], tmp: Path) -> ExecGate | None:
        """The gate for a `go test`/`go run` command, else None (hold the command)."""
        if Path(command[0]).name != "go":
            return None
        args = command[1:]
        if args[:1] == ["-C"]:
            args = args[2:]
        if not args or args[0] not in GATE_GO_SUBCOMMANDS:
            return None
        # A program run through the user's own -exec would skip the gate.
        if any(a.lstrip("-").startswith("exec") for a in args if a.startswith("-")):
            return None
        if "exec" in os.environ.get("GOFLAGS", "") or any(c.isspace() for c in str(tmp)):
            return None
        if os.statvfs(tmp).f_flag & os.ST_NOEXEC:
            return None
        script, fifo = tmp / "gate", tmp / "ready"
        script.write_text(GATE_SCRIPT)
        script.chmod(0o700)
        os.mkfifo(fifo, 0o600)
        return cls(script, fifo)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        user = env.get("GOFLAGS")
        if user is not None:
            env["GOLEASH_CHECK_GOFLAGS"] = user
        env["GOFLAGS"] = f"{user or ''} -exec={self.script}".strip()
        env["GOLEASH_CHECK_GATE"] = str(self.fifo)
        return env

    def open(self, *, run: bool = True) -> None:
        """Let the waiting programs go: to run (followed by now), or to fail."""
        if run:
            Path(f"{self.fifo}.go").touch()
        # Read-write: never blocks, and every gate's open for reading returns from now
        # on (there is a writer) without waiting for data.
        self._held = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)

    def close(self) -> None:
        if self._held is None:
            self.open(run=False)  # never opened: the waiting gates fail, not hang
        if self._held is not None:
            os.close(self._held)
            self._held = None


def _spawn(
    command: list[str], gate: ExecGate | None, *, stdout_to_stderr: bool
) -> tuple[int, int | None]:
    """Fork CMD: (pid, release fd). Without a gate CMD is held before its exec until
    the release fd is written. With `stdout_to_stderr` CMD writes to goleash's
    stderr, leaving stdout to the report (--json stays parseable)."""
    env = gate.env() if gate is not None else dict(os.environ)
    r, w = os.pipe() if gate is None else (-1, -1)
    pid = os.fork()
    if pid == 0:  # child
        try:
            if stdout_to_stderr:
                os.dup2(2, 1)
            if gate is None:
                os.close(w)
                if os.read(r, 1) != b"x":  # goleash gave up: never run unchecked
                    os._exit(127)
                os.close(r)
            os.execvpe(command[0], command, env)
        except OSError as exc:
            os.write(2, f"goleash check: cannot run {command[0]}: {exc}\n".encode())
        os._exit(127)
    if gate is None:
        os.close(r)
        return pid, w
    return pid, None


def _tree(root: int) -> set[int]:
    """ROOT's live descendants (processes, not threads), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out and len(out) < 65536:
                out.add(c)
                todo.append(c)
    return out


def _follow_tree(probes: Any, root: int) -> set[int]:
    """Follow ROOT and what it started before the probes were loaded. A fork during a
    scan is found by the next one (its parent is followed by then); until one finds
    nothing new."""
    probes.follow(root)
    seen: set[int] = set()
    for _ in range(16):
        new = _tree(root) - seen
        if not new:
            break
        for pid in new:
            probes.follow(pid)
        seen |= new
    return seen


DRAIN_POLL_MS = 2


def _wake(_signum: int, _frame: object) -> None:
    """SIGCHLD: nothing to do; its arrival ends the current wait for events (EINTR)."""


def _kill_tree(root: int) -> None:
    for pid in [root, *_tree(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(root, 0)


class _ProbeLoader(threading.Thread):
    """Compiles and loads check.bpf.c (BCC, seconds) off the main thread: the compile
    runs in C with the GIL released, beside the imports and the command's start."""

    def __init__(self) -> None:
        super().__init__(name="check-bpf-compile", daemon=True)
        self.probes: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            from goleash.probes.testleaks import CheckProbes

            self.probes = CheckProbes()
        except BaseException as exc:  # handed to the caller
            self.error = exc

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            from goleash.probes.testleaks import CheckProbeError

            if isinstance(self.error, CheckProbeError):
                raise GoleashError(f"{self.error} (goleash check needs root and BPF)")
            raise self.error
        return self.probes


@dataclass(frozen=True)
class Prepared:
    compiled: bool  # False: a cached program was there and the kernel took it
    seconds: float
    cache_dir: Path


def prepare() -> Prepared:
    """Compile check.bpf.c for this kernel and BCC now and keep it in the program
    cache (`goleash prepare`, run by the host's set-up as DKMS builds modules at
    install): a later `goleash check` loads it instead of compiling (~0.7 s idle,
    seconds on a busy machine) while the command it runs waits. The program is
    loaded once, as a check loads it, so one the kernel refuses is found here."""
    from goleash.probes.bpfimage import cache_dir
    from goleash.probes.testleaks import CheckProbeError, CheckProbes

    started = time.monotonic()
    try:
        probes = CheckProbes()
    except CheckProbeError as exc:
        raise GoleashError(f"{exc} (goleash prepare needs root and BPF)") from exc
    probes.close()
    return Prepared(probes.origin.source != "cache", time.monotonic() - started, cache_dir())


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
    if shutil.which(command[0]) is None:
        raise CheckUsageError(f"command not found: {command[0]}")
    started = time.monotonic()
    # Until the probes are loaded a SIGINT or SIGTERM (a CI timeout) must not kill
    # goleash alone, leaving the command held or its programs waiting at the gate.
    _interrupt.signals.clear()
    _interrupt.command_pid = None
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="goleash-check-") as tmp:
            return _run(command, Path(tmp), ignore, baseline, poll_ms, stdout_to_stderr, started)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Interrupt:
    """The signal handler while the probes load: it kills the command's tree at once
    and remembers the signal, and _run raises KeyboardInterrupt once loading is over.
    It never raises itself: raised inside an import (an importlib lock callback), the
    exception was swallowed and left the loader thread waiting on the import lock."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.command_pid: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        if self.command_pid is not None:
            for pid in [self.command_pid, *_tree(self.command_pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


_interrupt = _Interrupt()


def _run(
    command: list[str],
    tmp: Path,
    ignore: IgnoreList | None,
    baseline: set[Any] | None,
    poll_ms: int,
    stdout_to_stderr: bool,
    started: float,
) -> CheckReport:
    # The command first: `go test` builds while the rest of goleash loads.
    gate = ExecGate.for_command(command, tmp)
    pid, release = _spawn(command, gate, stdout_to_stderr=stdout_to_stderr)
    _interrupt.command_pid = pid
    helper = None
    try:
        # Then, while this process is small and has no threads: the removal of the
        # probes at the end waits for the kernel there, not here.
        from goleash.probes.bpfload import ReleaseHelper

        helper = ReleaseHelper.start()
        loader = _ProbeLoader()
        from goleash.node.checktrace import Checker  # heavy: beside the compile

        probes = loader.result()
        if _interrupt.signals:
            probes.close(helper)
            raise KeyboardInterrupt
    except BaseException:
        _kill_tree(pid)
        if gate is not None:
            gate.close()
        if helper is not None:
            helper.close()
        raise
    checker = Checker(probes, command, ignore or IgnoreList(), baseline or set())
    try:
        exit_code = _supervise(probes, checker, pid, release, gate, poll_ms)
    finally:
        if gate is not None:
            gate.close()
        checker.close()
        probes.close(helper)
    report = checker.report(exit_code, time.monotonic() - started)
    if not report.processes:
        report.notes.append(
            "no Go program ran under the command (test results cached? add -count=1)"
        )
    return report


def _handle(checker: Any, events: list[Any]) -> None:
    """Act on each event; a process stopped for one always goes on."""
    from goleash.probes.testleaks import FOLLOW_EXEC, FOLLOW_EXIT, PROCESS_EXIT

    for ev in events:
        try:
            if ev.kind == FOLLOW_EXEC:
                checker.on_exec(ev.pid, ev.path)
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


def _supervise(
    probes: Any, checker: Any, pid: int, release: int | None, gate: ExecGate | None, poll_ms: int
) -> int | None:
    """Follow the command until it exits and its last events are handled: its exit code."""
    from goleash.probes.testleaks import FOLLOW_EXEC, PROCESS_EXIT

    exit_code: int | None = None
    forwarded = {}

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        forwarded[s] = signal.signal(s, forward)
    # The command's exit interrupts the wait for events (SIGCHLD; the Checker's thread
    # blocks it), so the report follows it at once, not a poll later.
    forwarded[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _wake)
    try:
        # What it started so far: the toolchain, and gates waiting (nothing to check
        # can have run: it waits at a gate, or the command itself is held).
        _follow_tree(probes, pid)
        if release is not None:
            os.write(release, b"x")
            os.close(release)
        if gate is not None:
            gate.open()
        done_at: float | None = None
        while True:
            # Once the command is gone every program it waited for was handled (each
            # waited, stopped, for its event to be): a short look for stragglers.
            events = probes.poll(poll_ms if done_at is None else DRAIN_POLL_MS)
            _handle(checker, events)
            # What reading their goroutines at exit needs, read now they run again.
            try:
                checker.prepare()
            except Exception as exc:
                checker.notes.append(f"{type(exc).__name__}: {exc}")
            if exit_code is None:
                wpid, status = os.waitpid(pid, os.WNOHANG)
                if wpid == pid:
                    exit_code = os.waitstatus_to_exitcode(status)
                    if exit_code < 0:
                        exit_code = 128 - exit_code
                    done_at = time.monotonic()
            elif done_at is not None and (not events or time.monotonic() - done_at > 0.1):
                # Drained: the command waited for its children, each of which waited
                # stopped for its exit event to be handled; a poll that finds nothing
                # after it ended means nothing is left (up to 0.1 s for stragglers).
                break
        counters = probes.counters()
        checker.execs += counters["skipped_execs"]  # judged before: went on unstopped
        full = counters["follow_table_full"]
        if full:
            checker.notes.append(f"{full} processes were not followed (follow table full)")
    finally:
        # Processes that exec'd or exited after the command did (daemons it left) may
        # be stopped with their events unread: stop following, then resume them.
        # A SIGTERM forwarded to the command can orphan children mid-exec: each PID
        # followed until now is resumed, not only those whose event arrived.
        with contextlib.suppress(Exception):
            stopped = set(probes.unfollow_all())
            stopped |= {ev.pid for ev in probes.poll(0) if ev.kind in (FOLLOW_EXEC, PROCESS_EXIT)}
            for p in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGCONT)
        for s, h in forwarded.items():
            signal.signal(s, h)
    return exit_code
