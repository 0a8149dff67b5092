"""A realistic service, not only the worst case (issue "Cheaper tracing", part 2).

tests/fixtures/go/service: a std-lib HTTP/1.1 (keep-alive) or HTTP/2 (TLS) server whose
handler does about 100 us of real work per request (JSON decode, a fan-out to 2
short-lived goroutines that encode and hash, a map update under a mutex, a JSON
answer), loaded by its own client in a separate, untraced process that measures
throughput and p99 latency.

The server runs untraced, under each part of goleash's defaults alone, and under all
of them (a cost breakdown):
  goroutine probes   the creation/exit uprobes, their counts read every 5 s
  inventory          the memory read of every goroutine every 5 s (a snapshot)
  ReadFrame timing   (HTTP/2) `--func http2.ReadFrame` under the default 1% budget,
                     its panic probe and its goexit1 clean-up probe included
  goleash defaults   all of the above, as `goleash run` sets them up

Besides throughput and p99 (both hurt by anything else on the machine), each run
measures the server's own CPU time per request (utime + stime from /proc: a uprobe
trap and its BPF program are charged to the thread that hits them), which is what
the probes take from the service whatever else runs on the host, and the agent's
CPU as a share of one core (what it takes from the host). Runs are interleaved
(untraced, then each configuration, the order rotated every round) and medians
compared; every run's figures are printed. Each run loads the server for one interval
first, unmeasured (WARMUP_S), so traced runs are measured in the governor's steady
state, as a long-running service sees it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goleash.bench import Report, fixture
from goleash.node.funcwatch import FunctionWatch
from goleash.node.tracker import ProcessTracker
from goleash.probes.budget import OverheadBudget, hit_costs_ns
from goleash.probes.goroutines import GoroutineProbes
from goleash.probes.target import GoProcess

TOOLCHAIN = os.environ.get("GOLEASH_BENCH_GO", "1.22.10")
REPEATS = int(os.environ.get("GOLEASH_BENCH_REPEATS", "3"))
SECONDS = float(os.environ.get("GOLEASH_BENCH_SERVICE_S", "6"))
INTERVAL_S = 5.0  # the agent's default interval: snapshots and latency intervals
WARMUP_S = float(os.environ.get("GOLEASH_BENCH_SERVICE_WARMUP_S", str(INTERVAL_S + 0.5)))
WORKERS = 8
FUNC = "http2.ReadFrame"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of PID (the process's own CPU, kernel time of its
    uprobe traps included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _every(interval: float, work: Callable[[], object]) -> Callable[[], None]:
    """Run WORK every INTERVAL seconds on a thread; returns its stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            work()

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def end() -> None:
        stop.set()
        t.join()

    return end


# --- what each configuration attaches ------------------------------------------------


# A configuration yields what its probes were hit so far: name -> (hits, emulated).
Hits = Callable[[], dict[str, tuple[int, bool]]]


def _tracker_hits(probes: GoroutineProbes | None) -> dict[str, tuple[int, bool]]:
    if probes is None or not probes.compiled:
        return {}
    c = probes.read(with_live=False).counters
    create_emulated = all(s.emulated for s in probes.create_sites)
    return {
        "goroutine create": (c["create_hits"], create_emulated),
        "goroutine exit (goexit1)": (c["exit_hits"], probes.sites.exit.emulated),
    }


def _watch_hits(watch: FunctionWatch | None) -> dict[str, tuple[int, bool]]:
    lat = watch.latency if watch is not None else None
    prog = lat._prog if lat is not None else None
    if lat is None or prog is None:
        return {}
    st = prog.stats(0)
    return {
        f"{FUNC} entry": (st["entry_hits"], lat.funcs[0].sites.entry.emulated),
        f"{FUNC} RET": (st["ret_hits"], False),
        f"{FUNC} NOP before RET": (st["ret_nop_hits"], True),
        "funclat goexit1": (prog.counters()["exit_hits"], lat.exit_site.emulated),
    }


@contextmanager
def _goroutine_probes(proc: GoProcess, _h2: bool) -> Iterator[Hits]:
    probes = GoroutineProbes(proc)
    probes.attach()
    stop = _every(INTERVAL_S, lambda: probes.read(with_live=False))
    try:
        yield lambda: _tracker_hits(probes)
    finally:
        stop()
        probes.close()


@contextmanager
def _inventory(proc: GoProcess, _h2: bool) -> Iterator[Hits]:
    tracker = ProcessTracker(proc, use_probes=False)
    tracker.start()
    stop = _every(INTERVAL_S, tracker.snapshot)
    try:
        yield dict
    finally:
        stop()
        tracker.close()


@contextmanager
def _readframe(proc: GoProcess, h2: bool) -> Iterator[Hits]:
    if not h2:
        yield dict
        return
    watch = FunctionWatch(proc, [FUNC], interval=INTERVAL_S, budget_fraction=0.01)
    watch.start()
    stop = _every(INTERVAL_S, watch.take)
    try:
        yield lambda: _watch_hits(watch)
    finally:
        stop()
        watch.close()


@contextmanager
def _defaults(proc: GoProcess, h2: bool) -> Iterator[Hits]:
    """What `goleash run` (--func http2.ReadFrame on HTTP/2) does to one process."""
    tracker = ProcessTracker(proc, budget=OverheadBudget())
    tracker.start()
    watch = None
    try:
        if h2:
            watch = FunctionWatch(proc, [FUNC], interval=INTERVAL_S, budget_fraction=0.01)
            watch.start()

        def snapshot() -> None:
            tracker.snapshot()
            if watch is not None:
                watch.take()

        stop = _every(INTERVAL_S, snapshot)
        try:
            yield lambda: {**_tracker_hits(tracker.probes), **_watch_hits(watch)}
        finally:
            stop()
    finally:
        if watch is not None:
            watch.close()
        tracker.close()


@dataclass(frozen=True)
class Config:
    name: str
    setup: Callable[[GoProcess, bool], Any] | None  # None: untraced
    h2_only: bool = False


CONFIGS = [
    Config("untraced", None),
    Config("goroutine probes", _goroutine_probes),
    Config("inventory", _inventory),
    Config("ReadFrame timing", _readframe, h2_only=True),
    Config("goleash defaults", _defaults),
]


# --- one run ----------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p99_ms: float
    server_us_per_req: float
    agent_cpu: float  # share of one core, while the load ran (0 untraced)
    load: float  # the host's 1-minute load average at the end
    # Probe hits per request, per probe, and what they cost at the budget's per-hit
    # costs (probes/budget.py: measured on this host once, probes/hitcost.py).
    hits_per_req: dict[str, float] = field(default_factory=dict)
    modeled_us_per_req: float = 0.0


def _load(binary: Path, proto: str, addr: str, seconds: float) -> subprocess.Popen[str]:
    """A client, ready: a line on its stdin starts the load, it prints the result."""
    client = subprocess.Popen(
        [str(binary), "-mode", "client", "-proto", proto, "-addr", addr]
        + ["-seconds", str(seconds), "-workers", str(WORKERS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    client.stdout.readline()
    return client


def _result(client: subprocess.Popen[str]) -> dict[str, Any]:
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write("\n")
    client.stdin.flush()
    res: dict[str, Any] = json.loads(client.stdout.readline())
    return res


def _once(binary: Path, proto: str, cfg: Config) -> Run:
    server = subprocess.Popen(
        [str(binary), "-mode", "server", "-proto", proto],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # TLS handshake errors when clients go away
        text=True,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        pid = ready["pid"]
        with ExitStack() as stack:
            hits: Hits = dict
            if cfg.setup is not None:
                hits = stack.enter_context(cfg.setup(GoProcess.attach(pid), proto == "h2"))
            # Load for a first interval, unmeasured: the overhead governor plans each
            # interval from the rates it measured in the last, and a long-running
            # service is seen in that steady state (every configuration alike).
            clients.append(_load(binary, proto, ready["addr"], WARMUP_S))
            _result(clients[-1])
            clients.append(client := _load(binary, proto, ready["addr"], SECONDS))
            hits0 = hits()
            agent0, server0, wall0 = _cpu_s(), _proc_cpu_s(pid), time.monotonic()
            res = _result(client)
            server_s = _proc_cpu_s(pid) - server0
            agent_s, wall = _cpu_s() - agent0, time.monotonic() - wall0
            hits1 = hits()
        n = max(1.0, res["requests_per_s"] * SECONDS)
        per_req = {k: ((h - hits0.get(k, (0, e))[0]) / n, e) for k, (h, e) in hits1.items()}
        emulated_ns, stepped_ns = hit_costs_ns()
        return Run(
            rps=res["requests_per_s"],
            p99_ms=res["p99_ns"] / 1e6,
            server_us_per_req=server_s / n * 1e6,
            agent_cpu=agent_s / wall if cfg.setup is not None else 0.0,
            load=os.getloadavg()[0],
            hits_per_req={k: h for k, (h, _) in per_req.items()},
            modeled_us_per_req=sum(
                h * (emulated_ns if e else stepped_ns) for h, e in per_req.values()
            )
            / 1e3,
        )
    finally:
        for p in (*clients, server):
            if p.poll() is None:
                p.kill()
                p.wait()


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    return (s[n // 2] + s[(n - 1) // 2]) / 2


def _selected() -> list[Config]:
    want = os.environ.get("GOLEASH_BENCH_SERVICE_CONFIGS")
    if not want:
        return CONFIGS
    names = {w.strip() for w in want.split(",")}
    return [c for c in CONFIGS if c.setup is None or c.name in names]


def run(report: Report) -> None:
    binary = fixture("service", TOOLCHAIN)
    report.line("toolchain", float(TOOLCHAIN.split(".")[1]), "go1.N", f"go{TOOLCHAIN}")
    emulated_ns, stepped_ns = hit_costs_ns()  # measured here once (probes/hitcost.py)
    report.line("uprobe hit cost the budget counts, emulated", emulated_ns, "ns/hit", "this host")
    report.line("uprobe hit cost the budget counts, single-stepped", stepped_ns, "ns/hit")
    protos = os.environ.get("GOLEASH_BENCH_PROTOS", "h1,h2").split(",")
    for proto, label in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        if proto not in protos:
            continue
        configs = [c for c in _selected() if proto == "h2" or not c.h2_only]
        runs: dict[str, list[Run]] = {c.name: [] for c in configs}
        traced = configs[1:]
        for i in range(REPEATS):
            k = i % len(traced)
            for cfg in [configs[0], *traced[k:], *traced[:k]]:
                r = _once(binary, proto, cfg)
                runs[cfg.name].append(r)
                print(
                    f"    run {i + 1} {label} {cfg.name:<18} {r.rps:8.0f} req/s  "
                    f"p99 {r.p99_ms:7.2f} ms  server {r.server_us_per_req:6.1f} us/req  "
                    f"agent {r.agent_cpu * 100:5.2f}% core  load {r.load:5.1f}  "
                    f"probes {r.modeled_us_per_req:5.2f} us/req modeled",
                    flush=True,
                )
                if r.hits_per_req:
                    print(
                        "      hits/req: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in r.hits_per_req.items()),
                        flush=True,
                    )
        _summarize(report, label, runs)


def _summarize(report: Report, label: str, runs: dict[str, list[Run]]) -> None:
    base = runs["untraced"]
    rps0 = _median([r.rps for r in base])
    p99_0 = _median([r.p99_ms for r in base])
    cpu0 = _median([r.server_us_per_req for r in base])
    report.line(f"service {label} untraced", rps0, "req/s", f"{WORKERS} clients")
    report.line(f"service {label} untraced p99", p99_0, "ms")
    report.line(f"service {label} untraced server CPU", cpu0, "us/req")
    for name, rs in runs.items():
        if name == "untraced":
            continue
        goal = name == "goleash defaults"
        report.line(
            f"service {label} {name}: throughput kept",
            _median([r.rps for r in rs]) / rps0,
            "ratio",
            "goal >= 0.98" if goal else "",
        )
        report.line(
            f"service {label} {name}: p99 traced / untraced",
            _median([r.p99_ms for r in rs]) / p99_0,
            "ratio",
            "goal <= 1.02" if goal else "",
        )
        report.line(
            f"service {label} {name}: server CPU per request",
            _median([r.server_us_per_req for r in rs]) / cpu0,
            "ratio",
            "traced / untraced",
        )
        report.line(
            f"service {label} {name}: probe cost modeled / server CPU",
            _median([r.modeled_us_per_req for r in rs]) / cpu0,
            "ratio",
            "hits x per-hit cost (measured here) / untraced us per request",
        )
        for probe in rs[0].hits_per_req:
            report.line(
                f"service {label} {name}: {probe} hits per request",
                _median([r.hits_per_req.get(probe, 0.0) for r in rs]),
                "hits",
            )
        report.line(
            f"service {label} {name}: agent CPU",
            _median([r.agent_cpu for r in rs]) * 100,
            "% core",
            "Beyla publishes 0.5-2% for its Go probes" if goal else "",
        )
