"""Goroutine tracking cost, as ratios measured in one run (issue "Goroutine lifetimes").

1. The physical limit: one hit of an empty uprobe at an emulated instruction
   (`push %rbp`) and at a single-stepped one (the prologue's `cmp`), on a tight
   Go call loop, against the same loop untraced.
2. goleash's cost per hit and hits per goroutine on a goroutine-churn workload, by
   default (creation trapped only) and with --lifetimes (goexit1 too), as a ratio to
   empty programs at the same sites attached the same way (uprobe_multi links where
   the kernel has them): the same trap, so the ratio is what goleash's programs add.
   Then the programs' own run time per hit from the kernel's bpf_stats, in a run of
   its own (the accounting slows every run). The same workload under bpftrace
   probing runtime.newproc1 and runtime.goexit1 at their entries (the usual way).
3. Throughput of std-lib HTTP/2 and HTTP/1.1 (one goroutine per request)
   client+server pairs: untraced, goleash, bpftrace.
4. Inventory of 100k live goroutines from memory: time, and the stall the traced
   process saw, next to a pprof goroutine?debug=2 capture of the same process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from goleash.bench import Report, bpftrace, fixture
from goleash.gobin.disasm import entry_site, goroutine_probe_sites
from goleash.probes.bpfstats import run_stats, stats_enabled
from goleash.probes.goroutines import GoroutineProbes
from goleash.probes.inventory import read_goroutines
from goleash.probes.target import GoProcess
from goleash.probes.uprobe import empty_probes

TOOLCHAIN = os.environ.get("GOLEASH_BENCH_GO", "1.22.10")
REPEATS = 5


class Workload:
    """A benchload process that waits on stdin so tracers attach before it runs."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.p = subprocess.Popen(
            [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.p.stdout is not None
        ready = json.loads(self.p.stdout.readline())
        self.pid: int = ready["pid"]

    def send(self, line: str) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def go(self) -> dict[str, Any]:
        res = self.send("")
        self.p.wait(timeout=120)
        return res

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]


@contextmanager
def _goleash(
    pid: int,
    hits: dict[str, int],
    *,
    lifetimes: bool = False,
    run_ns: dict[str, float] | None = None,
) -> Iterator[None]:
    """goleash's goroutine probes on PID; with RUN_NS, the kernel's bpf_stats on
    meanwhile and each program's run time per hit put there."""
    proc = GoProcess.attach(pid)
    probes = GoroutineProbes(proc, lifetimes=lifetimes)
    probes.attach()
    try:
        if run_ns is None:
            yield
        else:
            fds = probes.program.program_fds()
            with stats_enabled():
                before = {fd: run_stats(fd) for fdl in fds.values() for fd in fdl}
                yield
                after = {fd: run_stats(fd) for fd in before}
            for name, fdl in fds.items():
                ns = sum(after[fd][0] - before[fd][0] for fd in fdl)
                runs = sum(after[fd][1] - before[fd][1] for fd in fdl)
                if runs:
                    run_ns[name] = ns / runs
    finally:
        r = probes.read(with_live=False)
        hits.update(r.counters)
        probes.close()


@contextmanager
def _bpftrace_usual(binary: Path, pid: int) -> Iterator[None]:
    """Goroutine births and exits the usual way: probes at the functions' entries.

    On a loaded host bpftrace may take more than the helper's 30 s to exit (it
    detaches its uprobes one by one); the run was measured by then and the helper
    kills it, so that is not a failed section."""
    cm = bpftrace(binary, pid, {"runtime.newproc1": "created", "runtime.goexit1": "exited"})
    cm.__enter__()
    try:
        yield
    finally:
        try:
            cm.__exit__(None, None, None)
        except subprocess.TimeoutExpired:
            print("bench: bpftrace was slow to exit (killed after the measured run)")


Tracer = Callable[[int], Any]


def _measure(binary: Path, args: list[str], key: str, tracer: Tracer | None) -> float:
    w = Workload(binary, *args)
    try:
        if tracer is None:
            return float(w.go()[key])
        with tracer(w.pid):
            return float(w.go()[key])
    finally:
        w.kill()


def compare(
    binary: Path, args: list[str], key: str, tracers: dict[str, Tracer | None]
) -> dict[str, float]:
    """Median of REPEATS runs per tracer, the runs interleaved (a, b, c, a, b, c, ...)
    so that drift on the machine hits every variant alike."""
    runs: dict[str, list[float]] = {name: [] for name in tracers}
    for _ in range(REPEATS):
        for name, tracer in tracers.items():
            runs[name].append(_measure(binary, args, key, tracer))
    return {name: _median(v) for name, v in runs.items()}


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(report: Report) -> None:
    binary = fixture("benchload", TOOLCHAIN)
    report.line("toolchain", float(TOOLCHAIN.split(".")[1]), "go1.N", f"go{TOOLCHAIN}")
    emulated_hit, sites, exit_site = _physical_limit(report, binary)
    _churn(report, binary, sites, exit_site, emulated_hit)
    _http_throughput(report, binary, sites)
    _inventory_vs_pprof(report, binary)


def _physical_limit(report: Report, binary: Path) -> tuple[float, list[int], int]:
    """1. An empty uprobe hit, emulated and single-stepped, on a Go call loop.
    Returns the emulated hit's cost (ns), the file offsets of goleash's default
    sites (creation) and of the exit site (--lifetimes)."""
    from goleash.gobin.binary import GoBinary
    from goleash.gobin.symbols import symbol_table

    with GoBinary(binary) as gb:
        proc_syms = symbol_table(gb)
        addr, size = proc_syms.require("main.work")
        push = entry_site(gb, "main.work", addr, size)
        first_offset = gb.vaddr_to_offset(addr)
        gsites = goroutine_probe_sites(gb, proc_syms.lookup)
        sites = [x.file_offset for x in gsites.create_sites]
        exit_site = gsites.exit.file_offset
    n_calls = 200_000
    call_args = ["-mode", "call", "-n", str(n_calls)]
    calls = compare(
        binary,
        call_args,
        "ns_per_call",
        {
            "untraced": None,
            "emulated": lambda pid: empty_probes(str(binary), pid, [push.file_offset]),
            "stepped": lambda pid: empty_probes(str(binary), pid, [first_offset]),
        },
    )
    base = calls["untraced"]
    emulated_hit = calls["emulated"] - base
    report.line("Go call, untraced", base, "ns/call")
    report.line(f"empty uprobe hit, emulated `{push.instruction}`", emulated_hit, "ns/hit")
    report.line("empty uprobe hit, single-stepped `cmp` (entry)", calls["stepped"] - base, "ns/hit")
    report.line("single-stepped / emulated hit cost", (calls["stepped"] - base) / emulated_hit, "x")
    return emulated_hit, sites, exit_site


def _churn(
    report: Report, binary: Path, sites: list[int], exit_site: int, emulated_hit: float
) -> None:
    """2. goleash's cost per goroutine and per hit on a goroutine-churn workload."""
    n_g = 200_000
    churn_args = ["-mode", "churn", "-n", str(n_g)]
    hits: dict[str, int] = {}
    hits_lt: dict[str, int] = {}
    tracers: dict[str, Tracer | None] = {
        "untraced": None,
        "empty probes at goleash's sites": lambda pid: empty_probes(str(binary), pid, sites),
        "goleash": lambda pid: _goleash(pid, hits),
        "goleash --lifetimes": lambda pid: _goleash(pid, hits_lt, lifetimes=True),
        "empty probes at goleash --lifetimes' sites": lambda pid: empty_probes(
            str(binary), pid, [*sites, exit_site]
        ),
    }
    if shutil.which("bpftrace"):
        tracers["bpftrace"] = lambda pid: _bpftrace_usual(binary, pid)
    cpu0 = _cpu_s()
    churn = compare(binary, churn_args, "ns_per_goroutine", tracers)
    agent_cpu = (_cpu_s() - cpu0) / REPEATS
    untraced = churn["untraced"]
    for name, v in churn.items():
        report.line(f"churn, {name}", v, "ns/goroutine")
    report.line(
        "churn slowdown, goleash / untraced", churn["goleash"] / untraced, "x", "goal <= 6.5"
    )
    report.line(
        "churn slowdown, goleash --lifetimes / untraced",
        churn["goleash --lifetimes"] / untraced,
        "x",
    )
    for label, counted, key, empty_key in (
        ("goleash", hits, "goleash", "empty probes at goleash's sites"),
        (
            "goleash --lifetimes",
            hits_lt,
            "goleash --lifetimes",
            "empty probes at goleash --lifetimes' sites",
        ),
    ):
        hits_per_g = (counted.get("create_hits", 0) + counted.get("exit_hits", 0)) / n_g
        per_g = churn[key] - untraced
        empty_per_g = churn[empty_key] - untraced
        report.line(
            f"{label} probe hits per goroutine",
            hits_per_g,
            "hits",
            "goal 1" if label == "goleash" else "",
        )
        # The goal's measure: the same sites, the same kind of probe, the same workload.
        report.line(
            f"{label} cost per hit / empty hit at the same sites (churn)",
            per_g / max(empty_per_g, 1e-9),
            "x",
            "goal <= 1.2" if label == "goleash" else "what the BPF programs add",
        )
        # Not the goal's measure: an empty hit at another site (main.work's `push`) on
        # another workload, where a trap costs about half what it does amid the churn.
        report.line(
            f"{label} cost per hit / empty hit in the call loop (another site)",
            per_g / max(hits_per_g, 1e-9) / emulated_hit,
            "x",
        )
    _program_run_time(report, binary, churn_args)
    report.line("agent CPU per churn run (compile+attach+read, both modes)", agent_cpu, "s")
    if "bpftrace" in churn:
        report.line(
            "bpftrace cost / goleash cost per goroutine",
            (churn["bpftrace"] - untraced) / max(churn["goleash"] - untraced, 1e-9),
            "x",
            "goal >= 12",
        )


def _program_run_time(report: Report, binary: Path, churn_args: list[str]) -> None:
    """goleash's programs' own run time per hit, from the kernel's bpf_stats, in runs
    of their own: the accounting adds two clock reads to every program run."""
    for label, lifetimes in (("goleash", False), ("goleash --lifetimes", True)):
        run_ns: dict[str, float] = {}

        def tracer(pid: int, lt: bool = lifetimes, out: dict[str, float] = run_ns) -> Any:
            return _goleash(pid, {}, lifetimes=lt, run_ns=out)

        _measure(binary, churn_args, "ns_per_goroutine", tracer)
        for name, ns in sorted(run_ns.items()):
            report.line(f"{label}: {name} run time per hit (kernel bpf_stats)", ns, "ns/hit")


def _http_throughput(report: Report, binary: Path, sites: list[int]) -> None:
    """3. HTTP/2 and HTTP/1.1 requests per second, traced each way / untraced."""
    for mode in ("http2", "http1"):
        args = ["-mode", mode, "-seconds", "3", "-workers", "8"]
        # Empty programs at goleash's sites: what the traps alone cost this workload.
        tracers: dict[str, Tracer | None] = {
            "untraced": None,
            "empty probes at goleash's sites": lambda pid: empty_probes(str(binary), pid, sites),
            "goleash": lambda pid: _goleash(pid, {}),
        }
        if shutil.which("bpftrace"):
            tracers["bpftrace"] = lambda pid: _bpftrace_usual(binary, pid)
        rps = compare(binary, args, "requests_per_s", tracers)
        report.line(f"{mode} untraced", rps["untraced"], "req/s")
        for name in ("empty probes at goleash's sites", "goleash", "bpftrace"):
            if name in rps:
                goal = {"http2": "goal >= 0.88", "http1": "goal >= 0.95"}[mode]
                goal = goal if name == "goleash" else ""
                report.line(
                    f"{mode} traced by {name} / untraced",
                    rps[name] / rps["untraced"],
                    "ratio",
                    goal,
                )


def _wait_for_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _inventory_vs_pprof(report: Report, binary: Path) -> None:
    """4. Reading 100k goroutines from memory vs pprof's capture, and the stalls."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = Workload(
        binary, "-mode", "hold", "-n", "100000", "-pprof", f"127.0.0.1:{port}", "-watch-stalls"
    )
    try:
        proc = GoProcess.attach(w.pid)
        w.send("stall")  # reset the stall meter
        t0 = time.monotonic()
        inv = read_goroutines(proc)
        inv_s = time.monotonic() - t0
        stall_inv = w.send("stall")["worst_delay_ns"]
        report.line(
            "inventory of 100k goroutines from memory",
            inv_s * 1000,
            "ms",
            f"{len(inv.goroutines)} read",
        )
        report.line("  traced process's worst stall during it", stall_inv / 1e6, "ms", "goal: none")
        _wait_for_http(f"http://127.0.0.1:{port}/debug/pprof/", timeout_s=10)
        w.send("stall")
        t0 = time.monotonic()
        urllib.request.urlopen(
            f"http://127.0.0.1:{port}/debug/pprof/goroutine?debug=2", timeout=60
        ).read()
        pprof_s = time.monotonic() - t0
        stall_pprof = w.send("stall")["worst_delay_ns"]
        report.line("pprof goroutine?debug=2 of the same process", pprof_s * 1000, "ms")
        report.line("  traced process's worst stall during it", stall_pprof / 1e6, "ms")
    finally:
        w.kill()
