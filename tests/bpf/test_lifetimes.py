"""One trap per goroutine by default, real uprobes on real Go programs.

Without the exit probe nothing in the kernel frees a birth record: the tables must
still never fill (records of goroutines no longer live are freed each interval),
counts stay exact, --lifetimes brings exact lifetimes back, the budget takes the
exit probe off first (lifetimes sampled), and with every probe off the runtime's
own goid counter still counts the goroutines created.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import gobuild
from goleash.gobin.offsets import _find_structs, _path_offset, go_release
from goleash.node.tracker import ProcessTracker, SiteSummary
from goleash.probes.budget import OverheadBudget
from goleash.probes.goidgen import SCHEDT_GOIDGEN_OFFSET
from goleash.probes.goroutines import GoroutineProgram
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import running_populations, tracked_pair

pytestmark = pytest.mark.root

COUNTS = {"orphan": 3, "sleeper": 2}
REPO = Path(__file__).resolve().parents[2]
OLDEST_AND_NEWEST = [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]]


def site(sites: list[SiteSummary], marker: str) -> SiteSummary:
    fname, line = gobuild.marker_line("populations", marker)
    found = [s for s in sites if s.go_statement.endswith(f"{fname}:{line}")]
    assert len(found) == 1, f"no single site for {marker} in {sites}"
    return found[0]


def family_members(snap) -> set[int]:
    fs = site(snap.sites, "family")
    return {g.goid for g in snap.goroutines if (g.gopc, g.startpc) == (fs.gopc, fs.startpc)}


def slot_of(pid: int, goid: int, slots: int) -> int:
    """bpf/goroutines.bpf.c slot_of: where a birth record goes."""
    return (goid + pid * 2654435761) & (slots - 1)


def unrecorded_only_by_collision(snap, members: set[int], slots: int, births: int) -> bool:
    """Every member without a birth record lost its slot to a later birth of its own
    process: another member at the same slot, or one of the other BIRTHS since the
    members were born (the runtime's own goroutines). None was crowded out by the
    records of goroutines no longer live."""
    taken = [slot_of(snap.pid, g, slots) for g in members]
    lacking = members & snap.ages_lower_bound
    alone = [g for g in lacking if taken.count(slot_of(snap.pid, g, slots)) == 1]
    return len(alone) <= births - len(members)


@pytest.mark.parametrize("toolchain", OLDEST_AND_NEWEST)
def test_table_never_fills_without_the_exit_probe(toolchain: str) -> None:
    """100k short-lived goroutines through a 64-slot table with no exit probe: no
    drop, exact counts, and the goroutines born afterwards still get their birth
    records (exact ages): a birth takes a slot its process's dead goroutine held."""
    with running_populations(toolchain, **COUNTS) as pop:
        no_limit = OverheadBudget(cpu_fraction=float("inf"))  # this churn is the point
        tracker = ProcessTracker(GoProcess.attach(pop.pid), max_live=64, budget=no_limit)
        try:
            tracker.start()
            assert tracker.probes is not None and not tracker.probes.exits_attached
            n = 100_000
            for _ in range(4):
                assert pop.command(f"churn {n // 4}", timeout=120) == {"churned": n // 4}
                tracker.snapshot()
            snap = tracker.snapshot()
            churn = site(snap.sites, "churn")
            assert (churn.created, churn.exited, churn.live) == (n, n, 0)
            assert snap.mode == "probes"
            assert churn.lifetime_mean_s is None and snap.lifetimes == "off"
            assert snap.probe_hits == {"create_hits": snap.probe_hits["create_hits"]} | {
                "exit_hits": 0,
                "newproc_hits": 0,
            }
            assert snap.probe_hits["create_hits"] == sum(s.created for s in snap.sites) >= n
            # The dead goroutines' records never pushed a birth out of the slots.
            assert tracker.probes.program.hash_entries(pop.pid) == 0

            hits_before = snap.probe_hits["create_hits"]
            pop.command("family 40")
            snap = tracker.snapshot()
            kids = family_members(snap)
            assert len(kids) == 40
            births = snap.probe_hits["create_hits"] - hits_before
            assert unrecorded_only_by_collision(snap, kids, 64, births)
            assert snap.dropped["live_table_full"] == 0
        finally:
            tracker.close()


def test_dead_records_of_one_process_do_not_crowd_out_another() -> None:
    """Two processes, one program, 64 slots: the first's dead goroutines held every
    slot until its interval freed them; the second then records all its births."""
    toolchain = gobuild.TOOLCHAINS[-1]
    program = GoroutineProgram(max_live=64, max_sites=1024, max_live_per_process=8)
    try:
        with tracked_pair(program, toolchain, **COUNTS) as ((a, ta), (b, tb)):
            a.churn(5000)
            snap_a = ta.snapshot()  # frees a's records of its dead goroutines
            assert site(snap_a.sites, "churn").exited == 5000
            hits_before = tb.snapshot().probe_hits["create_hits"]
            b.command("family 40")
            snap_b = tb.snapshot()
            kids = family_members(snap_b)
            assert len(kids) == 40
            births = snap_b.probe_hits["create_hits"] - hits_before
            assert unrecorded_only_by_collision(snap_b, kids, 64, births)
            assert snap_b.dropped["live_table_full"] == 0
    finally:
        program.close()


def test_lifetimes_exact_then_sampled_then_off_under_budget() -> None:
    """--lifetimes over budget: the exit probe goes first (births still counted,
    lifetimes now a sample), then the creation probe; quiet again, both return."""
    toolchain = gobuild.TOOLCHAINS[-1]
    with running_populations(toolchain, **COUNTS) as pop:
        tracker = ProcessTracker(
            GoProcess.attach(pop.pid), lifetimes=True, budget=OverheadBudget(cpu_fraction=0.001)
        )
        try:
            tracker.start()
            assert tracker.snapshot().lifetimes == "exact"
            pop.churn(20000)  # ~40k hits in well under a second: >> 0.1% of a core
            snap = tracker.snapshot()
            assert (snap.mode, snap.lifetimes) == ("probes", "sampled")
            assert tracker.probes.attached and not tracker.probes.exits_attached
            assert "exit probe detached" in snap.mode_reason
            churn = site(snap.sites, "churn")
            assert churn.lifetime_mean_s is not None, "the exits seen so far are a sample"
            pop.churn(20000)
            snap = tracker.snapshot()
            assert snap.mode == "inventory-only" and not tracker.probes.attached
            # Every birth was trapped (the probe left after the second churn), so
            # exits derived from births and live counts are exact.
            churn = site(snap.sites, "churn")
            assert (churn.created, churn.exited, churn.live) == (40000, 40000, 0)
            snap = tracker.snapshot()  # quiet: back on, exits included
            assert snap.mode == "probes" and tracker.probes.exits_attached
            assert snap.lifetimes == "sampled", "exits were missed meanwhile"
        finally:
            tracker.close()


@pytest.mark.parametrize(
    ("toolchain", "variant"),
    [(gobuild.TOOLCHAINS[0], "default"), (gobuild.TOOLCHAINS[-1], "pie")],
)
def test_goidgen_counts_births_with_the_probes_off(toolchain: str, variant: str) -> None:
    """Under the budget's floor no probe is attached; the runtime's goid counter
    (sched.goidgen, ahead by at most 16 goids per P) still counts what was created."""
    with running_populations(toolchain, variant, **COUNTS) as pop:
        pop.command("gc")  # the GC's own goroutines exist before we start counting
        tracker = ProcessTracker(
            GoProcess.attach(pop.pid), budget=OverheadBudget(cpu_fraction=0.001)
        )
        try:
            tracker.start()
            assert tracker.goidgen_unavailable == ""
            pop.churn(20000)
            assert tracker.snapshot().mode == "inventory-only"
            pop.churn(5000)  # no probe sees these
            snap = tracker.snapshot()
            assert snap.mode == "inventory-only"
            assert snap.created_source == "goidgen"
            bound = snap.created_error_bound
            assert bound is not None and bound % 16 == 0 and bound > 0
            assert abs(snap.totals["created"] - 25000) <= bound
            assert site(snap.sites, "churn").created == 20000, "per site: what probes saw"
        finally:
            tracker.close()


def test_goidgen_refused_without_symbols() -> None:
    """A stripped binary has no runtime.sched symbol: no counter, said why, and the
    probes' own counts stand."""
    with running_populations(gobuild.TOOLCHAINS[-1], "stripped", **COUNTS) as pop:
        tracker = ProcessTracker(GoProcess.attach(pop.pid))
        try:
            tracker.start()
            assert "runtime.sched" in tracker.goidgen_unavailable
            pop.churn(300)
            snap = wait_for(
                lambda: (s := tracker.snapshot()) and site(s.sites, "churn").exited == 300 and s,
                "churn counted",
            )
            assert (snap.created_source, site(snap.sites, "churn").created) == ("probes", 300)
        finally:
            tracker.close()


def test_goidgen_offset_matches_dwarf(toolchain: str) -> None:
    """The per-release offset of schedt.goidgen is what the binary's DWARF says."""
    binary = gobuild.build("populations", toolchain)
    with open(binary, "rb") as f:
        structs = _find_structs(ELFFile(f).get_dwarf_info(), {"runtime.schedt"})
        offset = _path_offset(structs["runtime.schedt"], "goidgen")
    assert offset == SCHEDT_GOIDGEN_OFFSET[go_release(f"go{toolchain}")]


@pytest.mark.parametrize(("flag", "expected"), [((), "off"), (("--lifetimes",), "exact")])
def test_cli_trace_says_whether_lifetimes_are_exact(flag: tuple[str, ...], expected: str) -> None:
    with running_populations(gobuild.TOOLCHAINS[-1], **COUNTS) as pop:
        p = subprocess.run(
            [sys.executable, "-m", "goleash.cli", "trace", "--pid", str(pop.pid)]
            + ["--duration", "1", "--interval", "0.5", "--json", *flag],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["lifetimes"] == expected
        assert out["probe_hits"]["exit_hits"] == 0 or expected == "exact"
