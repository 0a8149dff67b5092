"""A node full of idle Go services (issue "Cheaper tracing", part 3).

N idle Go processes (default 50, $GOLEASH_BENCH_FLEET), built with every installed
toolchain from 1.21 on, plain, stripped and PIE in turn, then `goleash agent --pid`
over all of them, as a subprocess so its CPU and memory are its own:

- time from the agent's start until it logged every process as followed;
- agent CPU per additional process: the agent's CPU until all N are followed minus
  that of an agent run over one of them alone (start-up, the program loaded from
  the cache, one analysis), over N - 1. (The agent analyses every new executable before it places
  probes, so the CPU at its first "following" line no longer marks one process.)
- agent RSS once all are followed, and its peak after the steady-state window;
- steady-state agent CPU, as a share of one core, over a few default intervals.

The agents run with an image cache of their own (a fresh $XDG_CACHE_HOME): the
first agent over one process alone meets it cold (BCC compiles goroutines.bpf.c, in
a child process), the next ones warm (they load the cached program), as a node's
first agent and every later one (a restarted container) would. Agent
CPU includes its children's (the compiler process); its RSS does not (another
process, gone once the program is built): the compile's own peak is reported apart.

Goals: <= 10 s, <= 100 ms per process, RSS <= 200 MB, <= 2% of a core.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from goleash.bench import Report, fixture
from goleash.gobuild import installed_toolchains

N = int(os.environ.get("GOLEASH_BENCH_FLEET", "50"))
INTERVAL_S = 5.0  # the agent's default
STEADY_INTERVALS = 3
FOLLOW_TIMEOUT_S = 300.0
VARIANTS = ("default", "stripped", "pie")
_FOLLOWING = re.compile(r"following PID (\d+) ")


def _toolchains() -> list[str]:
    found = [
        v for v in installed_toolchains() if tuple(int(x) for x in v.split(".")[:2]) >= (1, 21)
    ]
    if not found:
        raise RuntimeError("no Go toolchain >= 1.21 installed (make setup)")
    return found


def _binaries(n: int) -> list[Path]:
    tcs = _toolchains()
    combos = [(tc, v) for v in VARIANTS for tc in tcs]
    return [fixture("benchload", *combos[i % len(combos)]) for i in range(n)]


def _proc_cpu_s(pid: int) -> float:
    """PID's CPU, with that of its children it waited for (a compiler process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Follows:
    """Reads the agent's log: when each PID was followed, and the agent's CPU then."""

    def __init__(self, agent: subprocess.Popen[str], want: set[int]) -> None:
        self.agent = agent
        self.want = want
        self.seen: dict[int, tuple[float, float]] = {}  # pid -> (monotonic, agent CPU s)
        self.all_done = threading.Event()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.agent.stderr is not None
        for line in self.agent.stderr:
            if len(self.log) < 2000:
                self.log.append(line)
            m = _FOLLOWING.search(line)
            if m and int(m.group(1)) in self.want:
                try:
                    cpu = _proc_cpu_s(self.agent.pid)
                except OSError:
                    cpu = float("nan")
                self.seen[int(m.group(1))] = (time.monotonic(), cpu)
                if self.want <= set(self.seen):
                    self.all_done.set()


def _probes_alone(report: Report, pids: list[int]) -> None:
    """The goroutine probes' own share of following a process (its row in the one
    program and its uprobes), apart from analysing its executable."""
    from goleash.probes.goroutines import GoroutineProbes, load_count, node_program
    from goleash.probes.target import GoProcess

    program = node_program()
    loads = load_count()
    cpu0 = time.process_time()
    program.compile()
    report.line(
        "goroutines program load (once per agent)",
        time.process_time() - cpu0,
        "CPU-s",
        program.origin.source if program.origin else "",
    )
    procs = [GoProcess.attach(pid) for pid in pids]
    probes = [GoroutineProbes(p, program=program) for p in procs]
    try:
        cpu0 = time.process_time()
        for pr in probes:
            pr.attach()
        attach_ms = (time.process_time() - cpu0) / len(probes) * 1000
        cpu0 = time.process_time()
        for pr in probes:
            pr.read()
        read_ms = (time.process_time() - cpu0) / len(probes) * 1000
    finally:
        for pr in probes:
            pr.close()
        program.close()
        for p in procs:
            p.close()
    report.line("  per process: its row + uprobes attached", attach_ms, "CPU-ms")
    report.line("  per process: its counts read (one table walk for all)", read_ms, "CPU-ms")
    report.line("  BPF programs loaded for all processes", load_count() - loads, "programs")


_COMPILE_PEAK = """
import resource, sys
from goleash.probes import bpfimage, goroutines
from goleash.probes.bpfsrc import bpf_dir
src = bpf_dir() / "goroutines.bpf.c"
flags = goroutines.node_program().cflags()
key = bpfimage.cache_key([src, *sorted(src.parent.glob("*.h"))], flags)
bpfimage.compile_in_child(src.read_text(), flags, key)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _compile_peak(report: Report) -> None:
    """The compiler process's own peak RSS (a cold cache: once per node, kernel and
    BCC), measured as the only child of a process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_PEAK], capture_output=True, text=True, check=True
    )
    report.line("compiler process (cold cache only): its peak RSS", int(out.stdout) / 1024, "MB")


def _start_idle(binaries: list[Path], procs: list[subprocess.Popen[bytes]]) -> None:
    """Start one idle process per binary (into `procs`, so the caller stops them all)."""
    for b in binaries:
        procs.append(
            subprocess.Popen(
                [str(b), "-mode", "hold", "-n", "10"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
    for p in procs:  # each says {"ready": true, ...} once its goroutines are up
        assert p.stdout is not None
        p.stdout.readline()


def _steady_state(report: Report, agent_pid: int) -> None:
    """The agent's CPU over whole intervals after the last follow."""
    time.sleep(INTERVAL_S)
    c0, w0 = _proc_cpu_s(agent_pid), time.monotonic()
    time.sleep(STEADY_INTERVALS * INTERVAL_S)
    c1, w1 = _proc_cpu_s(agent_pid), time.monotonic()
    report.line(
        f"agent CPU, steady state ({INTERVAL_S:g} s interval)",
        (c1 - c0) / (w1 - w0) * 100,
        "% core",
        "goal <= 2",
    )


def _agent(pids: set[int]) -> tuple[subprocess.Popen[str], _Follows, float]:
    """`goleash agent --pid ...` over PIDS: (agent, its follows, monotonic start)."""
    cmd = [
        sys.executable,
        "-m",
        "goleash.cli",
        "agent",
        "--pid",
        *map(str, sorted(pids)),
        "--server",
        f"127.0.0.1:{_free_port()}",  # nobody listens: batches stay buffered
        "--health-listen",
        "off",
        "--metrics-listen",
        "off",
        "--interval",
        str(INTERVAL_S),
    ]
    t0 = time.monotonic()
    agent = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env()
    )
    follows = _Follows(agent, pids)
    if not follows.all_done.wait(FOLLOW_TIMEOUT_S):
        _stop(agent)
        raise RuntimeError(
            f"only {len(follows.seen)} of {len(pids)} processes followed after "
            f"{FOLLOW_TIMEOUT_S:.0f} s:\n" + "".join(follows.log[-20:])
        )
    return agent, follows, t0


_cache_home: list[str] = []  # run()'s image cache for the agents


def _env() -> dict[str, str]:
    """The agents' environment: the bench's own image cache (cold at first)."""
    return {**os.environ, "XDG_CACHE_HOME": _cache_home[-1]}


def _stop(agent: subprocess.Popen[str]) -> None:
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _one_alone(report: Report, pid: int, cache: str) -> float:
    """CPU of an agent until it follows one process alone (start-up, the program
    compiled or loaded, one analysis). The warm run is the base that "per
    additional process" is measured above: the agent over all N loads too."""
    agent, follows, t0 = _agent({pid})
    try:
        ((t, cpu),) = follows.seen.values()
        peak = _proc_kb(agent.pid, "VmHWM") / 1024
    finally:
        _stop(agent)
    report.line(f"one process alone ({cache} cache): agent start until followed", t - t0, "s")
    report.line(f"one process alone ({cache} cache): agent CPU until followed", cpu, "CPU-s")
    report.line(f"one process alone ({cache} cache): agent RSS peak", peak, "MB", "goal <= 200")
    return cpu


def run(report: Report) -> None:
    n = max(2, N)
    binaries = _binaries(n)  # built (or cached) before anything is timed
    report.line("idle Go processes", n, "procs", f"toolchains {', '.join(_toolchains())}")
    # The figures are wall-clock and CPU shares: a loaded machine stretches them.
    report.line("machine load (1 min) at start", os.getloadavg()[0], "", f"{os.cpu_count()} CPUs")
    procs: list[subprocess.Popen[bytes]] = []
    agent: subprocess.Popen[str] | None = None
    _cache_home.append(tempfile.mkdtemp(prefix="goleash-bench-fleet-"))
    try:
        _start_idle(binaries, procs)
        pids = {p.pid for p in procs}
        _one_alone(report, procs[0].pid, "cold")
        alone_cpu = _one_alone(report, procs[0].pid, "warm")
        agent, follows, t0 = _agent(pids)
        rss_followed = _proc_kb(agent.pid, "VmRSS") / 1024
        anon_followed = _proc_kb(agent.pid, "RssAnon") / 1024
        times = sorted(follows.seen.values())
        (first_t, _), (last_t, last_cpu) = times[0], times[-1]
        report.line("agent start until all followed", last_t - t0, "s", "goal <= 10")
        report.line("agent start until the first followed", first_t - t0, "s")
        report.line("agent CPU until all followed", last_cpu, "CPU-s")
        report.line(
            "agent CPU per additional process",
            (last_cpu - alone_cpu) / (n - 1) * 1000,
            "ms",
            "goal <= 100",
        )
        report.line("agent RSS, all followed", rss_followed, "MB", "goal <= 200")
        # The rest of RSS is file pages (libbcc/LLVM, the binaries read): page cache.
        report.line("  of which anonymous memory", anon_followed, "MB")

        _steady_state(report, agent.pid)
        report.line(
            "agent RSS peak (warm cache)", _proc_kb(agent.pid, "VmHWM") / 1024, "MB", "goal <= 200"
        )
        report.line("machine load (1 min) at the end", os.getloadavg()[0], "")
        _stop(agent)
        _probes_alone(report, sorted(pids))
        _compile_peak(report)
    finally:
        shutil.rmtree(_cache_home.pop(), ignore_errors=True)
        if agent is not None:
            _stop(agent)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
