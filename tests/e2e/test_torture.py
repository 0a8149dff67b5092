"""The agent on a hostile, busy host: it never dies and never hurts.

`goleash run` with no selection (every Go process of the host) while a generator on
this machine, bounded in count and time, keeps it busy: shell loops exec'ing
hundreds of short non-Go processes a second; short-lived Go processes of several
toolchains (plain, stripped, PIE, stripped PIE) living 50-500 ms, some SIGKILLed
while the agent reads them; Go processes exec'ing into another Go binary and into a
non-Go one; a non-Go ELF whose section table lies past its end, one truncated
before its section table (the kernel runs both), a shebang script; a running Go
binary replaced on disk; zombies. Two long-lived Go processes with known goroutine
populations run throughout.

It passes when the agent still runs at the end, `goleash ps` answered throughout,
the long-lived processes were followed with the right counts, the error counters
show the damaged binaries were seen, the agent's memory stayed under a ceiling, and every
target not killed on purpose exited 0, with its code bytes equal to the file's (no
int3 left behind) and no uprobe left for it in the kernel.

GOLEASH_TORTURE_S sets the generator's run time (default 120 s, the issue's floor).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gobuild
from goleash.gobin.binary import GoBinary
from goleash.probes.procmem import ProcessMemory, load_bias
from polling import wait_for
from populations import FLAGS, READY_TIMEOUT, read_json_line

pytestmark = [pytest.mark.root, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]
RUN_S = float(os.environ.get("GOLEASH_TORTURE_S", "120"))
TOOLCHAINS = ("1.19", "1.22.10", "1.25.5")
VARIANTS = ("default", "stripped", "pie", "stripped-pie")
MAX_GO_AT_ONCE = 6  # short-lived Go processes alive together (2 cores, shared)
MAX_GO_TOTAL = 1500
COUNTS = {"orphan": 12, "nilselect": 3, "condwait": 2, "worker": 2, "sleeper": 3}
# The agent with the embedded control plane: Python, BCC's LLVM, one BPF program per
# followed process. A ceiling that keeps a node safe. Known open problem: RSS still
# grows over this run (from ~0.5 to ~0.6-1.4 GiB with ~1300 short-lived Go processes,
# see the printed figures); until that is found, only the ceiling is asserted.
MAX_RSS_BYTES = 2 << 30


@dataclass
class Tally:
    """What the generator did, for the report and the exit-code checks."""

    go_started: int = 0
    go_killed: int = 0
    shell_execs: int = 0
    odd_execs: Counter[str] = field(default_factory=Counter)
    exit_codes: Counter[int] = field(default_factory=Counter)
    bad_exits: list[str] = field(default_factory=list)
    ps_ok: int = 0
    ps_failed: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    @property
    def max_rss(self) -> int:
        return max(self.rss, default=0)


# --- binaries -------------------------------------------------------------------------


def _go_binaries(tmp: Path) -> list[Path]:
    """Every toolchain x variant of the shortlived fixture, under names of our own."""
    out = []
    for tc in TOOLCHAINS:
        for v in VARIANTS:
            try:
                src = gobuild.build("shortlived", tc, "pie" if v == "stripped-pie" else v)
            except gobuild.ToolchainMissing:
                continue
            dst = tmp / f"glt-{tc}-{v}"
            shutil.copy(src, dst)
            if v == "stripped-pie":
                subprocess.run(["strip", "--strip-all", str(dst)], check=True)
            out.append(dst)
    assert len(out) >= 8, out
    return out


def _bad_section_table(tmp: Path) -> Path:
    """/bin/sleep with e_shoff far past the end: the kernel runs it all the same."""
    data = bytearray(Path("/bin/sleep").read_bytes())
    struct.pack_into("<Q", data, 0x28, 1 << 62)
    p = tmp / "glt-bad-shoff"
    p.write_bytes(data)
    p.chmod(0o755)
    return p


def _truncated(tmp: Path) -> Path:
    """/bin/sleep cut before its section header table (which ends the file): every
    PT_LOAD is still there, so it runs; its section table is half gone."""
    data = Path("/bin/sleep").read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    p = tmp / "glt-truncated"
    p.write_bytes(data[: shoff + 100])
    p.chmod(0o755)
    return p


def _script(tmp: Path) -> Path:
    p = tmp / "glt-script"
    p.write_text("#!/bin/sh\nsleep 0.2\nexit 0\n")
    p.chmod(0o755)
    return p


# --- the generator ------------------------------------------------------------------------


class Generator:
    def __init__(self, tmp: Path, go: list[Path], deadline: float) -> None:
        self.tmp, self.go, self.deadline = tmp, go, deadline
        self.tally = Tally()
        self.rng = random.Random(20261130)
        self.children: list[tuple[subprocess.Popen[bytes], str, bool]] = []  # proc, what, killed
        self.zombies: list[subprocess.Popen[bytes]] = []
        self.bad_shoff = _bad_section_table(tmp)
        self.truncated = _truncated(tmp)
        self.script = _script(tmp)
        self.replaced = tmp / "glt-replaced"

    def _spawn(self, args: list[str], what: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.children.append((p, what, False))
        return p

    def _reap(self, block: bool = False) -> None:
        keep = []
        for p, what, killed in self.children:
            if block and p.poll() is None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    killed = False  # we killed it for hanging: that is a failure below
                    self.tally.bad_exits.append(f"{what}: hung")
            rc = p.poll()
            if rc is None:
                keep.append((p, what, killed))
                continue
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            if p.stderr:
                p.stderr.close()
            if killed:
                continue
            self.tally.exit_codes[rc] += 1
            if rc != 0:
                self.tally.bad_exits.append(f"{what}: exit {rc} {err[-300:]!r}")
        self.children = keep

    def _alive_go(self) -> int:
        return sum(1 for p, what, _ in self.children if what.startswith("go") and p.poll() is None)

    def shell_loops(self) -> list[subprocess.Popen[str]]:
        """Two shells exec'ing true/sleep/cat until the deadline; each prints its count."""
        left = max(1, int(self.deadline - time.monotonic()))
        loop = (
            f"end=$(( $(date +%s) + {left} )); n=0; "
            'while [ "$(date +%s)" -lt "$end" ]; do '
            "/bin/true; /bin/sleep 0; /bin/cat /dev/null; /bin/true; n=$((n+5)); done; echo $n"
        )
        return [
            subprocess.Popen(["/bin/sh", "-c", loop], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]

    def go_once(self) -> None:
        exe = self.rng.choice(self.go)
        life = self.rng.randint(50, 500)
        p = self._spawn(
            [str(exe), "live", str(life), str(self.rng.randint(1, 40))], f"go {exe.name}"
        )
        self.tally.go_started += 1
        if self.rng.random() < 0.2:  # SIGKILLed while the agent is likely reading it
            time.sleep(self.rng.uniform(0.02, min(0.3, life / 1000)))
            p.kill()
            self.children[-1] = (p, f"go {exe.name}", True)
            self.tally.go_killed += 1

    def odd_once(self, n: int) -> None:
        go = self.rng.choice(self.go)
        other = self.rng.choice(self.go)
        kind = n % 6
        if kind == 0:  # Go exec'ing into another Go binary
            self._spawn([str(go), "exec", "150", str(other), "live", "200", "5"], "go exec go")
        elif kind == 1:  # Go exec'ing into a non-Go binary
            self._spawn([str(go), "exec", "150", "/bin/sleep", "0.2"], "go exec sleep")
        elif kind == 2:
            self._spawn([str(self.bad_shoff), "1.5"], "bad e_shoff ELF")
        elif kind == 3:
            self._spawn([str(self.truncated), "1.5"], "truncated ELF")
        elif kind == 4:
            self._spawn([str(self.script)], "shebang script")
        else:  # a running Go binary replaced on disk (a new inode under its path)
            shutil.copy(go, self.replaced)
            self._spawn([str(self.replaced), "live", "1500", "8"], "go replaced on disk")
            time.sleep(0.3)
            tmp = self.tmp / "glt-replaced.new"
            shutil.copy(other, tmp)
            tmp.rename(self.replaced)
        self.tally.odd_execs[
            ["go-exec-go", "go-exec-sleep", "bad-shoff", "truncated", "script", "replaced"][kind]
        ] += 1

    def zombie(self) -> None:
        """A Go process and a non-Go one that exit and are not reaped until the end."""
        for args in ([str(self.go[0]), "live", "50", "3"], ["/bin/true"]):
            self.zombies.append(subprocess.Popen(args))

    def run(self) -> None:
        shells = self.shell_loops()
        self.zombie()
        n = 0
        next_odd = time.monotonic()
        while time.monotonic() < self.deadline and self.tally.go_started < MAX_GO_TOTAL:
            if self._alive_go() < MAX_GO_AT_ONCE:
                self.go_once()
            if time.monotonic() >= next_odd:
                self.odd_once(n)
                n += 1
                next_odd = time.monotonic() + 1.0
            self._reap()
            time.sleep(0.05)
        self._reap(block=True)
        for s in shells:
            out, _ = s.communicate(timeout=60)
            self.tally.shell_execs += int(out.strip() or 0)
        for z in self.zombies:
            z.wait()


# --- the agent's side -----------------------------------------------------------------------


def _scrape(metrics: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _errors_by_stage(metrics: str) -> dict[str, float]:
    fam = _scrape(metrics).get("goleash_agent_process_errors", [])
    return {s.labels["stage"]: s.value for s in fam if s.name.endswith("_total")}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _text_differs(pid: int) -> list[int]:
    """Addresses where the process's code differs from its file (an int3 left)."""
    with GoBinary(f"/proc/{pid}/exe") as b, ProcessMemory(pid) as mem:
        bias = load_bias(pid, b)
        out = []
        for seg in b.segments:
            if not seg.executable:
                continue
            live = mem.read(seg.vaddr + bias, seg.filesz)
            disk = bytes(b.data[seg.offset : seg.offset + seg.filesz])
            out += [seg.vaddr + i for i in range(len(disk)) if live[i] != disk[i]][:10]
        return out


def _long_lived(tmp: Path, name: str, toolchain: str, variant: str) -> subprocess.Popen[str]:
    exe = tmp / name
    shutil.copy(gobuild.build("populations", toolchain, variant), exe)
    args = [str(exe)]
    for k, n in COUNTS.items():
        args += [f"-{FLAGS[k]}", str(n)]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    ready = read_json_line(p, READY_TIMEOUT)
    assert ready.get("ready") is True, ready
    return p


def _ps(address: str) -> list[dict[str, Any]]:
    r = subprocess.run(
        [*GOLEASH, "ps", "--server", address, "--json"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def _sites(address: str, pid: int) -> dict[str, int]:
    import grpc

    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc

    with grpc.insecure_channel(address) as ch:
        resp = q_grpc.GoleashServiceStub(ch).GetGoroutineSummary(
            q.GetGoroutineSummaryRequest(selector=q.ProcessSelector(pid=pid)), timeout=10
        )
    return {s.function: s.live for s in resp.sites}


def _our_uprobes(pids: set[int]) -> list[str]:
    path = Path("/sys/kernel/tracing/uprobe_events")
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines() if any(f"_{p}_" in ln for p in pids)]


def test_agent_survives_a_torture_host(tmp_path: Path) -> None:
    go = _go_binaries(tmp_path)
    long_lived = [
        _long_lived(tmp_path, "glt-long-a", "1.22.10", "default"),
        _long_lived(tmp_path, "glt-long-b", "1.25.5", "pie"),
    ]
    run = subprocess.Popen(
        [
            *GOLEASH,
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "run.db"),
            "--interval",
            "1",
            "--orphan-min-age",
            "0",
            "--health-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def drain() -> None:
        assert run.stderr is not None
        for line in run.stderr:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    log = lambda: "".join(lines)  # noqa: E731
    seen_pids: set[int] = {p.pid for p in long_lived}
    try:
        import re

        def endpoint(rx: str) -> str | None:
            for line in lines:
                m = re.search(rx, line)
                if m:
                    return m.group(1)
            assert run.poll() is None, log()
            return None

        address = wait_for(lambda: endpoint(r"control plane listening on (\S+)"), "run", 60)
        metrics = wait_for(lambda: endpoint(r"metrics on http://(\S+)/metrics"), "metrics", 60)
        for p in long_lived:
            wait_for(
                lambda p=p: next((r for r in _ps(address) if r["pid"] == p.pid), None),
                f"PID {p.pid} followed",
                60,
            )

        gen = Generator(tmp_path, go, time.monotonic() + RUN_S)
        worker = threading.Thread(target=gen.run, daemon=True)
        worker.start()
        while worker.is_alive():
            assert run.poll() is None, f"the agent died:\n{log()[-5000:]}"
            try:
                _ps(address)
                gen.tally.ps_ok += 1
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                gen.tally.ps_failed.append(str(exc)[:200])
            gen.tally.rss.append(_rss(run.pid))
            seen_pids |= {p.pid for p, _, _ in gen.children}
            worker.join(timeout=3.0)
        assert run.poll() is None, f"the agent died:\n{log()[-5000:]}"
        t = gen.tally
        errors = _errors_by_stage(metrics)
        print(
            f"\ntorture: {RUN_S:.0f}s; generator: {t.shell_execs} shell execs, "
            f"{t.go_started} Go processes ({t.go_killed} SIGKILLed), odd: {dict(t.odd_execs)}; "
            f"exit codes {dict(t.exit_codes)}; ps answered {t.ps_ok}x, failed {len(t.ps_failed)}; "
            f"agent RSS max {t.max_rss / 2**20:.0f} MiB (first half "
            f"{max(t.rss[: len(t.rss) // 2], default=0) / 2**20:.0f} MiB); "
            f"process errors by stage {errors}"
        )

        assert not t.ps_failed, t.ps_failed
        assert t.ps_ok >= RUN_S / 10
        assert not t.bad_exits, t.bad_exits
        assert t.shell_execs >= 100 * RUN_S, t.shell_execs  # "hundreds a second", loosely
        assert errors.get("judge", 0) >= 2, errors  # the bad e_shoff and truncated ELFs
        assert t.max_rss < MAX_RSS_BYTES, [r >> 20 for r in t.rss]
        for p in long_lived:
            sites = _sites(address, p.pid)
            for pop, n in COUNTS.items():
                assert sites.get(f"main.{pop}") == n, (p.pid, pop, sites)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
        rc = run.wait(timeout=60)
    assert rc == 0, log()[-5000:]
    assert not _our_uprobes(seen_pids), _our_uprobes(seen_pids)
    for p in long_lived:
        assert _text_differs(p.pid) == [], "code bytes differ from the file (int3 left?)"
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=30) == 0
