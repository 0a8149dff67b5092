"""The goroutine inventory read from a running process's memory, and `goleash dump`.

A `populations` fixture holds known numbers of goroutines parked in known ways
(it checks with runtime.Stack before saying "ready"). Read from outside, on every
toolchain, default, stripped and PIE, the inventory must count every creation site
exactly, name each wait as the runtime does, give each orphan its creator as parent
(Go 1.21+), and `goleash dump` must print the blocks a Go developer expects.
Needs root: reading another process's memory is a ptrace-level permission.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import gobuild
from goleash.gobin.errors import NotGoError, ProcessError
from goleash.probes.creation import creation_site
from goleash.probes.dump import build_dump, render_text
from goleash.probes.inventory import Goroutine, read_goroutines, wait_reason_names
from goleash.probes.procmem import MemoryFault, ProcessMemory
from goleash.probes.stacks import walk_stack
from goleash.probes.target import GoProcess
from populations import running_populations

pytestmark = pytest.mark.root

COUNTS = {"orphan": 50, "nilselect": 20, "condwait": 10, "worker": 4, "sleeper": 5}
# Population -> (started function, wait reason as runtime.Stack prints it). The
# fixture's nilselect is a select over two nil channels: "select" (a `select {}`
# would be "select (no cases)").
EXPECT = {
    "orphan": ("main.orphan", "chan receive"),
    "nilselect": ("main.nilselect", "select"),
    "condwait": ("main.condwait", "sync.Cond.Wait"),
    "sleeper": ("main.sleeper", "sleep"),
    "worker": ("main.worker", None),  # healthy: receiving, or running a job
    "churn": ("main.churn", None),
}
VARIANTS = tuple(gobuild.VARIANTS)  # default, stripped, pie, trimpath, cgo
FIXTURE_MAIN = gobuild.FIXTURES / "populations" / "main.go"


def source_line(text: str) -> int:
    """1-based line of the fixture's main.go holding `text`."""
    for n, line in enumerate(FIXTURE_MAIN.read_text().splitlines(), 1):
        if text in line:
            return n
    raise LookupError(text)


def site_of(population: str) -> tuple[str, str]:
    """(started function, "main.go:LINE") of the population's go statement."""
    file, line = gobuild.marker_line("populations", population)
    return EXPECT[population][0], f"{file}:{line}"


def short(site: tuple[str, str]) -> tuple[str, str]:
    """A site with its file's directory dropped (the build path varies)."""
    return site[0], Path(site[1]).name


def toolchain_version(toolchain: str) -> str:
    return f"go{toolchain}"


def has_parent_goid(toolchain: str) -> bool:
    return tuple(int(x) for x in toolchain.split(".")[:2]) >= (1, 21)


def by_site(proc: GoProcess, gs: list[Goroutine]) -> dict[tuple[str, str], list[Goroutine]]:
    out: dict[tuple[str, str], list[Goroutine]] = {}
    for g in gs:
        out.setdefault(short(creation_site(proc, g)), []).append(g)
    return out


def dump_blocks(text: str) -> dict[int, str]:
    """goid -> its block of a runtime.Stack style dump."""
    out = {}
    for block in text.split("\n\n"):
        m = re.match(r"goroutine (\d+) \[", block)
        assert m, f"not a goroutine block: {block!r}"
        out[int(m.group(1))] = block.rstrip("\n") + "\n"
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_inventory_and_dump_of_known_populations(toolchain: str, variant: str) -> None:
    with (
        running_populations(toolchain, variant, **COUNTS) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        assert proc.build_info.go_version.startswith(f"go{toolchain}")
        inv = read_goroutines(proc)
        assert inv.torn == 0
        sites = by_site(proc, inv.goroutines)

        # Every site counted exactly, each goroutine waiting as the runtime says.
        for population, n in COUNTS.items():
            members = sites.get(site_of(population), [])
            assert len(members) == n, f"{population}: {len(members)} live, want {n}"
            reason = EXPECT[population][1]
            if reason is not None:
                assert {(g.status, g.wait_reason) for g in members} == {("waiting", reason)}
        assert {g.goid for g in inv.goroutines} >= {1}
        assert len({g.goid for g in inv.goroutines}) == len(inv.goroutines)
        # The names come from the binary's own table, whatever its numbering.
        names = wait_reason_names(proc)
        assert names[0] == "" and {"chan receive", "select", "sleep"} <= set(names)

        # Orphans: their creators exited, and on Go 1.21+ g.parentGoid names them.
        orphans = sites[site_of("orphan")]
        creators = pop.creator_goids
        assert not {g.goid for g in inv.goroutines} & set(creators)
        if has_parent_goid(toolchain):
            per_creator = Counter(g.parent_goid for g in orphans)
            assert set(per_creator) == set(creators)
            assert sum(per_creator.values()) == COUNTS["orphan"]
        else:
            assert {g.parent_goid for g in orphans} == {None}

        # Stacks from outside: the orphan sits on its receive, under goexit.
        recv_line = source_line("<-orphanCh")
        for g in orphans[:3]:
            stack = walk_stack(proc, g)
            assert stack.complete, stack.note
            frames = [(f.function, Path(f.file).name, f.line) for f in stack.frames]
            assert frames[-1] == ("main.orphan", "main.go", recv_line), frames

        # The dump reads like runtime.Stack's.
        text = render_text(build_dump(proc))
        blocks = dump_blocks(text)
        _, creator_line = gobuild.marker_line("populations", "orphan")
        for g in orphans:
            block = blocks[g.goid]
            created = "created by main.creator"
            if has_parent_goid(toolchain):
                created += f" in goroutine {g.parent_goid}"
            assert re.fullmatch(
                rf"goroutine {g.goid} \[chan receive\]:\n"
                rf"main\.orphan\(\.\.\.\)\n\t\S+/main\.go:{recv_line} \+0x[0-9a-f]+\n"
                rf"{created}\n\t\S+/main\.go:{creator_line} \+0x[0-9a-f]+\n",
                block,
            ), block
        for g in sites[site_of("sleeper")]:
            assert blocks[g.goid].startswith(f"goroutine {g.goid} [sleep]:\ntime.Sleep(...)")
        # The runtime's own goroutines are left out, as runtime.Stack does.
        assert not any("created by runtime." in b for b in blocks.values())


def runtime_blocks(stacks: str) -> dict[int, str]:
    """runtime.Stack's dump with each function's arguments written `(...)`, as ours are
    (the runtime prints their register/stack values, which we cannot see)."""
    lines = []
    for line in stacks.splitlines():
        if line and not line.startswith(("\t", "goroutine ", "created by ")):
            line = line.rsplit("(", 1)[0] + "(...)"
        lines.append(line)
    return dump_blocks("\n".join(lines))


# The cgo variant links C externally: moduledata.rodata is then not .rodata's
# start, and the inline tree must still be found (inlined-into frames' lines).
@pytest.mark.parametrize("variant", VARIANTS)
def test_dump_matches_the_runtimes_own(toolchain: str, variant: str) -> None:
    """Every parked goroutine's block equals what runtime.Stack(all) prints for it in
    the same process: header, frames (inlined calls included), file:line +offset,
    created by. Goroutines that can wake up (workers, main) are left out."""
    counts = {"orphan": 6, "nilselect": 2, "condwait": 2, "sleeper": 2}
    with (
        running_populations(toolchain, variant, **counts) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        ours = dump_blocks(render_text(build_dump(proc)))
        theirs = runtime_blocks(pop.command("stacks")["stacks"])
        inv = read_goroutines(proc)
        sites = by_site(proc, inv.goroutines)
        parked = [g.goid for p in counts for g in sites[site_of(p)]]
        assert len(parked) == sum(counts.values())
        for goid in parked:
            assert ours[goid] == theirs[goid]
        # The same goroutines, too: the runtime's own ones left out by both.
        assert set(ours) == set(theirs)


def test_wait_since_is_set_by_a_gc_on_the_monotonic_clock(toolchain: str) -> None:
    """g.waitsince is set when a GC cycle finds the goroutine blocked, to the previous
    cycle's mark-termination time (work.tstart; 0 before any cycle ended), on the
    runtime's nanotime: CLOCK_MONOTONIC, the clock of Inventory.read_ns. Two GCs make
    sure it is set; the fixture may have run others while starting."""
    launched = time.monotonic_ns()
    with (
        running_populations(toolchain, orphan=5, sleeper=2) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        assert pop.command("gc") == {"gc": True}
        assert pop.command("gc") == {"gc": True}
        inv = read_goroutines(proc)
        sites = by_site(proc, inv.goroutines)
        for g in sites[site_of("orphan")] + sites[site_of("sleeper")]:
            assert launched < g.wait_since_ns <= inv.read_ns


def test_reading_while_goroutines_come_and_go(toolchain: str) -> None:
    """Reads racing thousands of goroutine births and exits (g structs reused while
    read) never fail and never miscount the goroutines that stay."""
    with (
        running_populations(toolchain, orphan=20, sleeper=3) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        errors: list[BaseException] = []

        def churn() -> None:
            try:
                for _ in range(5):
                    pop.churn(2000)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t = threading.Thread(target=churn)
        t.start()
        reads = 0
        while t.is_alive() or reads == 0:
            inv = read_goroutines(proc)
            reads += 1
            sites = by_site(proc, inv.goroutines)
            assert len(sites[site_of("orphan")]) == 20
            assert len(sites[site_of("sleeper")]) == 3
        t.join()
        assert not errors, errors
        # Once churn is over, none of its goroutines are left.
        churn_site = (
            "main.churn",
            "main.go:{}".format(*gobuild.marker_line("populations", "churn")[1:]),
        )
        assert churn_site not in by_site(proc, read_goroutines(proc).goroutines)


def test_proc_pid_mem_fallback_reads_the_same() -> None:
    """Where process_vm_readv is filtered (seccomp), /proc/PID/mem gives the same."""
    with (
        running_populations(gobuild.TOOLCHAINS[-1], orphan=30, condwait=3) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        fast = read_goroutines(proc)
        waiter = next(g for g in fast.goroutines if g.wait_reason == "sync.Cond.Wait")
        fast_stack = walk_stack(proc, waiter)
        proc.memory = ProcessMemory(pop.pid, use_process_vm_readv=False)
        slow = read_goroutines(proc)
        assert [(g.goid, g.status, g.wait_reason, g.gopc) for g in fast.goroutines] == [
            (g.goid, g.status, g.wait_reason, g.gopc) for g in slow.goroutines
        ]
        assert walk_stack(proc, waiter) == fast_stack and fast_stack.complete
        with pytest.raises(MemoryFault):
            proc.memory.read(8, 8)  # page zero is never mapped


def test_pid_that_does_not_exist() -> None:
    pid = _unused_pid()
    with pytest.raises(ProcessError, match=f"PID {pid}: no such process"):
        GoProcess.attach(pid)
    res = _goleash("dump", "--pid", str(pid))
    assert res.returncode == 2
    assert "no such process" in res.stderr and "Traceback" not in res.stderr


def test_process_that_exits_before_the_read() -> None:
    toolchain = gobuild.TOOLCHAINS[-1]
    with running_populations(toolchain, orphan=5) as pop:
        proc = GoProcess.attach(pop.pid)
        os.kill(pop.pid, signal.SIGKILL)
        pop.proc.wait()
        with pytest.raises(ProcessError, match="exited"):
            read_goroutines(proc)
        proc.close()


def test_process_that_exits_but_is_not_reaped() -> None:
    """A zombie has no memory left to read: an error, not an empty inventory."""
    toolchain = gobuild.TOOLCHAINS[0]
    with running_populations(toolchain, orphan=5) as pop:
        proc = GoProcess.attach(pop.pid)
        os.kill(pop.pid, signal.SIGKILL)
        _wait_until_zombie(pop.pid)
        with pytest.raises(ProcessError, match="exited"):
            read_goroutines(proc)
        with pytest.raises(ProcessError, match="exited"):
            GoProcess.attach(pop.pid)
        proc.close()


def test_non_go_process_is_refused() -> None:
    sleeper = subprocess.Popen(["sleep", "100"])
    try:
        with pytest.raises(NotGoError, match=f"PID {sleeper.pid} "):
            GoProcess.attach(sleeper.pid)
        res = _goleash("dump", "--pid", str(sleeper.pid))
        assert res.returncode == 2
        assert "not a Go binary" in res.stderr and "Traceback" not in res.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("variant", ["default", "stripped"])
def test_goleash_dump_command(variant: str) -> None:
    toolchain = gobuild.TOOLCHAINS[-1]
    with running_populations(toolchain, variant, orphan=12, condwait=2) as pop:
        res = _goleash("dump", "--pid", str(pop.pid))
        assert res.returncode == 0, res.stderr
        blocks = dump_blocks(res.stdout)
        heads = Counter(b.split("[", 1)[1].split("]", 1)[0] for b in blocks.values())
        assert heads["chan receive"] == 12 and heads["sync.Cond.Wait"] == 2
        assert f"PID {pop.pid} ({toolchain_version(toolchain)})" in res.stderr
        res = _goleash("dump", "--pid", str(pop.pid), "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["pid"] == pop.pid and doc["go_version"].startswith(f"go{toolchain}")
        orphans = [g for g in doc["goroutines"] if g["start_function"] == "main.orphan"]
        assert len(orphans) == 12
        assert {g["parent_goid"] for g in orphans} == set(pop.creator_goids)
        assert all(g["frames"][-1]["function"] == "main.orphan" for g in orphans)


# --- helpers ----------------------------------------------------------------------------


def _goleash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goleash.cli", *args], capture_output=True, text=True, timeout=120
    )


def _unused_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free PID")


def _wait_until_zombie(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            return
        time.sleep(0.005)  # polling the kernel's view of the process, with a deadline
    raise TimeoutError(f"PID {pid} did not become a zombie")
