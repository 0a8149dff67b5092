"""A realistic service, not only the worst case (issue "Cheaper tracing", part 2).

tests/fixtures/go/service: a std-lib HTTP/1.1 (keep-alive) or HTTP/2 (TLS) server whose
handler does about 100 us of real work per request (JSON decode, a fan-out to 2
short-lived goroutines that encode and hash, a map update under a mutex, a JSON
answer), loaded by its own client in a separate, untraced process that measures
throughput and p99 latency.

The server runs untraced and under goleash's defaults: goroutine probes, the memory
inventory every 5 s, and (HTTP/2) ReadFrame timed under the default 1% budget. Runs
are interleaved (untraced, traced, untraced, ...) and the medians compared, so drift
on the machine hits both alike; the figures are ratios within one run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from goleash.bench import Report, fixture
from goleash.node.funcwatch import FunctionWatch
from goleash.node.tracker import ProcessTracker
from goleash.probes.budget import OverheadBudget
from goleash.probes.target import GoProcess

TOOLCHAIN = os.environ.get("GOLEASH_BENCH_GO", "1.22.10")
REPEATS = int(os.environ.get("GOLEASH_BENCH_REPEATS", "5"))
SECONDS = 6.0  # at least one inventory (every 5 s) inside each run
INVENTORY_S = 5.0
WORKERS = 8


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@contextmanager
def _default_goleash(pid: int, h2: bool, cpu: list[float]) -> Iterator[None]:
    """What `goleash run --func http2.ReadFrame` does to one process by default."""
    proc = GoProcess.attach(pid)
    tracker = ProcessTracker(proc, budget=OverheadBudget())
    tracker.start()
    watch = None
    if h2:
        watch = FunctionWatch(proc, ["http2.ReadFrame"], interval=1.0, budget_fraction=0.01)
        watch.start()
    stop = threading.Event()

    def snapshots() -> None:
        while not stop.wait(INVENTORY_S):
            tracker.snapshot()
            if watch is not None:
                watch.take()

    t = threading.Thread(target=snapshots, daemon=True)
    t.start()
    t0 = _cpu_s()  # after the compile and attach: steady-state cost
    cpu.append(-(time.monotonic()))
    try:
        yield
    finally:
        cpu[-1] += time.monotonic()
        stop.set()
        t.join()
        if watch is not None:
            watch.close()
        tracker.close()
        # agent CPU while the load ran, as a share of one core (detach included)
        cpu[-1] = (_cpu_s() - t0) / cpu[-1]


def _once(binary: Path, proto: str, traced: bool, cpu: list[float]) -> dict[str, Any]:
    server = subprocess.Popen(
        [str(binary), "-mode", "server", "-proto", proto],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # TLS handshake errors when clients go away
        text=True,
    )
    client = None
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        client = subprocess.Popen(
            [
                str(binary),
                "-mode",
                "client",
                "-proto",
                proto,
                "-addr",
                ready["addr"],
                "-seconds",
                str(SECONDS),
                "-workers",
                str(WORKERS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        client.stdout.readline()

        def go() -> dict[str, Any]:
            assert client is not None and client.stdin is not None
            assert client.stdout is not None
            client.stdin.write("\n")
            client.stdin.flush()
            res: dict[str, Any] = json.loads(client.stdout.readline())
            return res

        if not traced:
            return go()
        with _default_goleash(ready["pid"], proto == "h2", cpu):
            return go()
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _median(v: list[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2]


def run(report: Report) -> None:
    binary = fixture("service", TOOLCHAIN)
    report.line("toolchain", float(TOOLCHAIN.split(".")[1]), "go1.N", f"go{TOOLCHAIN}")
    protos = os.environ.get("GOLEASH_BENCH_PROTOS", "h1,h2").split(",")
    for proto, label in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        if proto not in protos:
            continue
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        cpu: list[float] = []
        for _ in range(REPEATS):
            for traced in (False, True):
                runs[traced].append(_once(binary, proto, traced, cpu))
        rps = {k: _median([r["requests_per_s"] for r in v]) for k, v in runs.items()}
        p99 = {k: _median([r["p99_ns"] for r in v]) for k, v in runs.items()}
        report.line(f"service {label} untraced", rps[False], "req/s", f"{WORKERS} clients")
        report.line(f"service {label} untraced p99", p99[False] / 1e6, "ms")
        report.line(
            f"service {label} throughput kept, goleash defaults",
            rps[True] / rps[False],
            "ratio",
            "goal >= 0.98",
        )
        report.line(
            f"service {label} p99 traced / untraced",
            p99[True] / p99[False],
            "ratio",
            "goal <= 1.02",
        )
        report.line(
            f"service {label} agent CPU while tracing (median)",
            _median(cpu) * 100,
            "% core",
            "Beyla publishes 0.5-2% for its Go probes",
        )
