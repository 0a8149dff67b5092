"""Function-latency probe cost, as ratios measured in one run (issue "Function latency").

1. A tight Go call loop (benchload -mode call: main.work, which has a full prologue)
   untraced, and traced by goleash: entry probe only (emulated `push %rbp`), RET
   probes only (single-stepped), both (a timed call), and bpftrace's uprobe on the
   symbol (the first instruction, the single-stepped stack check; bpftrace 0.17
   cannot place a probe at an offset, so it cannot probe RETs: its entry is all it
   can compare).
2. Throughput of a std-lib HTTP/2 client+server (benchload -mode http2, one process)
   untraced and with HTTP/2 ReadFrame and net/http.(*conn).serve timed, at the default
   1% budget (hot functions sampled) and with no budget (every call timed).
3. Calls counted while timing is sampled: funclat's mixture at ~2,400 calls/s under the
   default budget, calls and quantiles against the program's own figures.

Runs are interleaved (a, b, c, a, b, c, ...) and the median taken, so drift on the
machine hits every variant alike.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from goleash.bench import Report, bpftrace, fixture
from goleash.probes.budget import OverheadBudget
from goleash.probes.funclat import FuncLatencyProbes
from goleash.probes.funcprog import LatencyProgram
from goleash.probes.funcs import FunctionIndex, resolve
from goleash.probes.funcsites import FuncProbeError, function_sites
from goleash.probes.target import GoProcess

TOOLCHAIN = os.environ.get("GOLEASH_BENCH_GO", "1.22.10")
REPEATS = 3
N_CALLS = 100_000

Tracer = Callable[[int], AbstractContextManager[Any]]


def _run(binary: Path, args: list[str], tracer: Tracer | None) -> dict[str, Any]:
    """One benchload run: it prints {"ready", "pid"}, waits for a line, prints a result."""
    p = subprocess.Popen(
        [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        pid = json.loads(p.stdout.readline())["pid"]

        def go() -> dict[str, Any]:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("\n")
            p.stdin.flush()
            res: dict[str, Any] = json.loads(p.stdout.readline())
            return res

        if tracer is None:
            return go()
        with tracer(pid):
            return go()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def _compare(
    binary: Path, args: list[str], key: str, tracers: dict[str, Tracer | None]
) -> dict[str, float]:
    runs: dict[str, list[float]] = {name: [] for name in tracers}
    for _ in range(REPEATS):
        for name, tracer in tracers.items():
            runs[name].append(float(_run(binary, args, tracer)[key]))
    return {name: sorted(v)[len(v) // 2] for name, v in runs.items()}


@contextmanager
def _groups(pid: int, symbol: str, which: tuple[str, ...]) -> Iterator[None]:
    """goleash's probes of one function, only the groups asked for."""
    proc = GoProcess.attach(pid)
    sel = resolve(FunctionIndex(proc.binary, proc.pclntab, proc.symbols), [symbol])
    sites = function_sites(proc, sel.functions[0])
    prog = LatencyProgram(proc, [sites], max_goroutines=1024, max_panic_sites=1, panic_sp_adj=0)
    try:
        if "rets" in which:
            prog.attach("rets", sites.rets, "fl_ret")
        if "entry" in which or "entry_timed" in which:
            # Count-only unless told to time (what it does between timing slices).
            prog.set_ctl(0, 1, "entry_timed" in which)
            prog.attach("entry", [sites.entry], "fl_entry")
        yield
    finally:
        prog.close()


@contextmanager
def _goleash(pid: int, patterns: list[str], budget: float) -> Iterator[None]:
    proc = GoProcess.attach(pid)
    sel = resolve(FunctionIndex(proc.binary, proc.pclntab, proc.symbols), patterns)
    probes = FuncLatencyProbes(proc, sel.functions, budget=OverheadBudget(cpu_fraction=budget))
    probes.attach()
    stop = False

    # Duty cycling needs its interval loop running while the load runs. The load may
    # end (and its process exit) during an interval: that ends the loop, not the bench.
    def loop() -> None:
        while not stop:
            try:
                probes.run_interval(0.5)
            except FuncProbeError:
                if proc.alive():
                    raise
                return

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop = True
        t.join()
        probes.close()


def run(report: Report) -> None:
    binary = fixture("benchload", TOOLCHAIN)
    report.line("toolchain", float(TOOLCHAIN.split(".")[1]), "go1.N", f"go{TOOLCHAIN}")

    # --- 1. per-call cost on a tight loop -------------------------------------------------
    sym = "main.work"
    calls = _compare(
        binary,
        ["-mode", "call", "-n", str(N_CALLS)],
        "ns_per_call",
        {
            "untraced": None,
            "entry": lambda pid: _groups(pid, sym, ("entry",)),
            "entry_timed": lambda pid: _groups(pid, sym, ("entry_timed",)),
            "rets": lambda pid: _groups(pid, sym, ("rets",)),
            "timed": lambda pid: _goleash(pid, [sym], math.inf),
            "bpftrace": lambda pid: bpftrace(binary, pid, {sym: "calls"}),
        },
    )
    base = calls["untraced"]
    entry, ret = calls["entry"] - base, calls["rets"] - base
    timed, bpft = calls["timed"] - base, calls["bpftrace"] - base
    report.line("Go call main.work, untraced", base, "ns/call")
    report.line("goleash entry probe hit, counting (emulated push rbp)", entry, "ns/hit")
    report.line(
        "goleash entry probe hit, timing (frame recorded)",
        calls["entry_timed"] - base,
        "ns/hit",
    )
    report.line("goleash RET probe hit (single-stepped ret)", ret, "ns/hit")
    report.line("RET hit / entry hit", ret / entry, "x", "only a NOP before a RET is cheaper")
    report.line("goleash timed call: overhead", timed, "ns/call", "entry + RET + pairing")
    report.line("goleash timed call / untraced call", calls["timed"] / base, "x")
    report.line("bpftrace symbol-entry hit (single-stepped cmp)", bpft, "ns/hit")
    report.line("goleash entry hit / bpftrace entry hit", entry / bpft, "x")
    report.line("goleash timed call / bpftrace entry-only hit", timed / bpft, "x")

    # --- 2. HTTP/2 throughput ------------------------------------------------------------
    funcs = ["http2.ReadFrame", "net/http.(*conn).serve"]
    rps = _compare(
        binary,
        ["-mode", "http2", "-seconds", "3"],
        "requests_per_s",
        {
            "untraced": None,
            "budget": lambda pid: _goleash(pid, funcs, 0.01),
            "every call": lambda pid: _goleash(pid, funcs, math.inf),
        },
    )
    report.line("HTTP/2 client+server, untraced", rps["untraced"], "req/s")
    report.line(
        "HTTP/2 throughput kept, ReadFrame + serve timed (1% budget)",
        rps["budget"] / rps["untraced"],
        "ratio",
    )
    report.line(
        "HTTP/2 throughput kept, every call timed (no budget)",
        rps["every call"] / rps["untraced"],
        "ratio",
    )

    # --- 3. calls counted while timing is sampled ------------------------------------------
    _sampled_accuracy(report)


def _sampled_accuracy(report: Report) -> None:
    """funclat's mixture (1/4/30 ms sleeps from 10 goroutines, ~2,400 calls/s here) for
    3 s under the default 1% budget: calls against the program's own count, quantiles
    of the timed calls against the program's own measurement of every call."""
    binary = fixture("funclat", TOOLCHAIN)
    rows: list[dict[str, float]] = []
    for _ in range(REPEATS):
        p = subprocess.Popen(
            [str(binary), "-mode", "mixture", "-goroutines", "10", "-duration", "3s"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "GOMAXPROCS": "8"},
        )
        assert p.stdin is not None and p.stdout is not None
        try:
            pid = int(p.stdout.readline().split()[1])
            proc = GoProcess.attach(pid)
            index = FunctionIndex(proc.binary, proc.pclntab, proc.symbols)
            sel = resolve(index, ["main.sleepFor"])
            probes = FuncLatencyProbes(proc, sel.functions, budget=OverheadBudget())
            probes.attach()
            try:
                got: list[Any] = []
                out: list[str] = []

                def wait(stdout: Any = p.stdout, out: list[str] = out) -> None:
                    out.append(stdout.readline())

                p.stdin.write("go\n")
                p.stdin.flush()
                reader = threading.Thread(target=wait, daemon=True)
                reader.start()
                while reader.is_alive():
                    got.append(probes.run_interval(0.5).functions[0])
                got.append(probes.flush().functions[0])
            finally:
                probes.close()
            res = json.loads(out[0])
        finally:
            p.kill()
            p.wait()
        total = got[0]
        for r in got[1:]:
            total = total + r
        row = {
            "rate": res["calls"] / 3.0,
            "calls": total.calls / res["calls"],
            "timed": total.timed / res["calls"],
            "exact": float(total.calls_exact),
            "attached": total.attached_fraction,
        }
        for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
            row[name] = (total.quantile_ns(q) or math.nan) / res["ns"][name]
        rows.append(row)

    def med(key: str) -> float:
        v = sorted(r[key] for r in rows)
        return v[len(v) // 2]

    def worst(key: str) -> float:
        return max((r[key] for r in rows), key=lambda x: abs(x - 1))

    report.line("sampled timing: calls/s of main.sleepFor (program's count)", med("rate"), "1/s")
    report.line("sampled timing: share of calls timed (1% budget)", med("timed"), "ratio")
    report.line("sampled timing: share of time probes attached", med("attached"), "ratio")
    report.line(
        "sampled timing: calls reported / program's count, worst run",
        worst("calls"),
        "ratio",
        f"exact in {sum(int(r['exact']) for r in rows)}/{len(rows)} runs",
    )
    for name in ("p50", "p90", "p99"):
        report.line(
            f"sampled timing: {name} timed / program's {name}, median (worst)",
            med(name),
            "ratio",
            f"worst {worst(name):.3f}",
        )
