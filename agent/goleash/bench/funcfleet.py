"""Following processes with function probes (`goleash agent --func`): what each
process costs the agent when its function probes are set up (issue "Cheaper
tracing", part 3, for funclat.bpf.c).

N idle copies of the funclat fixture (default 8, $GOLEASH_BENCH_FUNCFLEET; newest
toolchain, plain and PIE in turn), then `goleash agent --pid ... --func
main.sleepFor --panics` over them as a subprocess, with an image cache of its own:
first over one process alone (cold cache: the compiles run), then again alone
(warm), then over all N (warm):

- agent CPU until all N are followed, and per additional process (above the warm
  agent over one alone);
- agent RSS once all are followed, and whether it mapped LLVM/clang.

The figures are wall-clock and CPU: run on a quiet machine, compare within one run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from goleash.bench import Report, fixture
from goleash.bench.fleet import _Follows, _free_port, _proc_cpu_s, _proc_kb, _stop
from goleash.gobuild import installed_toolchains

N = int(os.environ.get("GOLEASH_BENCH_FUNCFLEET", "8"))
FOLLOW_TIMEOUT_S = 300.0
SETTLE_S = 2.0  # after the last follow: its function probes are attached by then
FUNCS = ("main.sleepFor", "main.recurse", "main.tiny")


def _start(binaries: list[Path]) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [str(b), "-mode", "quantiles"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for b in binaries
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().startswith("ready ")
    return procs


def _agent(pids: set[int], cache: str) -> tuple[subprocess.Popen[str], float, float, bool]:
    """An agent over PIDS until all are followed and settled: (agent, CPU-s, RSS MB,
    compiler mapped)."""
    cmd = [
        sys.executable,
        "-m",
        "goleash.cli",
        "agent",
        "--pid",
        *map(str, sorted(pids)),
        "--func",
        *FUNCS,
        "--panics",
        "--server",
        f"127.0.0.1:{_free_port()}",  # nobody listens: batches stay buffered
        "--health-listen",
        "off",
        "--metrics-listen",
        "off",
    ]
    env = {**os.environ, "XDG_CACHE_HOME": cache}
    agent = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    follows = _Follows(agent, pids)
    if not follows.all_done.wait(FOLLOW_TIMEOUT_S):
        _stop(agent)
        raise RuntimeError("not all followed:\n" + "".join(follows.log[-20:]))
    time.sleep(SETTLE_S)
    maps = Path(f"/proc/{agent.pid}/maps").read_text()
    return (
        agent,
        _proc_cpu_s(agent.pid),
        _proc_kb(agent.pid, "VmRSS") / 1024,
        "libLLVM" in maps or "libclang" in maps,
    )


def run(report: Report) -> None:
    n = max(2, N)
    tc = installed_toolchains()[-1]
    binaries = [fixture("funclat", tc, ("default", "pie")[i % 2]) for i in range(n)]
    report.line("idle Go processes, --func " + " ".join(FUNCS) + " --panics", n, "procs", tc)
    report.line("machine load (1 min) at start", os.getloadavg()[0], "", f"{os.cpu_count()} CPUs")
    cache = tempfile.mkdtemp(prefix="goleash-bench-funcfleet-")
    procs = _start(binaries)
    try:
        alone = 0.0
        for state in ("cold", "warm"):
            agent, alone, rss, llvm = _agent({procs[0].pid}, cache)
            _stop(agent)
            report.line(f"one process alone ({state} cache): agent CPU", alone, "CPU-s")
            report.line(f"one process alone ({state} cache): agent RSS", rss, "MB", f"LLVM {llvm}")
        agent, cpu, rss, llvm = _agent({p.pid for p in procs}, cache)
        _stop(agent)
        report.line("agent CPU until all followed (warm cache)", cpu, "CPU-s")
        report.line("agent CPU per additional process", (cpu - alone) / (n - 1) * 1000, "ms")
        report.line("agent RSS, all followed", rss, "MB", f"LLVM mapped: {llvm}")
    finally:
        for p in procs:
            p.kill()
            p.wait()
