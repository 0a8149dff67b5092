"""Goroutine lifetimes with real uprobes on real Go programs, every toolchain.

By default only goroutine creation is trapped (exits follow from births and the
live counts read from memory); --lifetimes also traps exits, for lifetimes.

The populations fixture holds known numbers of goroutines in known states and
starts short-lived ones on command, so every count here is exact, not a range.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gobuild
from goleash.node.tracker import ProcessTracker, SiteSummary
from goleash.probes.budget import OverheadBudget
from goleash.probes.target import GoProcess
from polling import wait_for
from populations import running_populations
from probe_evidence import goroutine_probe_bytes, int3_count, uprobe_fds

pytestmark = pytest.mark.root

COUNTS = {"orphan": 30, "nilselect": 7, "condwait": 5, "worker": 3, "sleeper": 4}
REPO = Path(__file__).resolve().parents[2]


def populations(toolchain: str, variant: str = "default", **counts: int):
    return running_populations(toolchain, variant, **(counts or COUNTS))


def site(snapshot_sites: list[SiteSummary], marker: str) -> SiteSummary:
    fname, line = gobuild.marker_line("populations", marker)
    found = [s for s in snapshot_sites if s.go_statement.endswith(f"{fname}:{line}")]
    assert len(found) == 1, f"no single site for {marker} ({fname}:{line}) in {snapshot_sites}"
    return found[0]


def has_parent_goid(toolchain: str) -> bool:
    """Go 1.21 added g.parentGoid: before it a parent is known only for goroutines the
    probes saw born (from g0.m.curg), never for those born before attach."""
    return tuple(int(x) for x in toolchain.split(".")[:2]) >= (1, 21)


def check_counts(toolchain: str, variant: str, *, lifetimes: bool = False) -> None:
    with populations(toolchain, variant) as pop:
        proc = GoProcess.attach(pop.pid)
        # the probes' exactness, not the governor's: with lifetimes a 2000-goroutine
        # burst costs about a 1% budget at this host's measured hit cost
        budget = OverheadBudget(cpu_fraction=math.inf) if lifetimes else None
        tracker = ProcessTracker(proc, orphan_min_age_s=0, lifetimes=lifetimes, budget=budget)
        try:
            tracker.start()
            assert tracker.mode == "probes"
            assert tracker.probes is not None and tracker.probes.exits_attached == lifetimes
            n = 2000
            assert pop.command(f"churn {n}") == {"churned": n}
            # Born while attached: 5 orphans whose creator exits (parents from the
            # probes on every Go version).
            late = pop.command("orphans 5")
            # A GC first, so that the runtime's mark workers (born at the first GC and
            # appended to allgs) are not born after the family. The family comes last:
            # a live parent with more children than there are dead gs to reuse (at most
            # n + a few), so the newest allgs entries are its children and a read that
            # misses the end of allgs shows in their count.
            assert pop.command("gc") == {"gc": True}
            fam_n = n + 200
            fam = pop.command(f"family {fam_n}")
            assert fam["family"] == fam_n

            def churn_done():
                snap = tracker.snapshot()
                s = site(snap.sites, "churn")
                # live: a goroutine is _Gdead a moment after goexit1 (our probe)
                return snap if (s.exited, s.live) == (n, 0) else None

            snap = wait_for(churn_done, "every churn goroutine to exit")
            churn = site(snap.sites, "churn")
            assert (churn.created, churn.exited, churn.live) == (n, n, 0)
            assert churn.function == "main.churn"
            if lifetimes:
                assert snap.lifetimes == "exact"
                assert churn.lifetime_mean_s is not None and churn.lifetime_mean_s < 5
            else:
                assert snap.lifetimes == "off"
                assert churn.lifetime_mean_s is None, "no lifetimes without the exit probe"

            # The family: every child counted, all stuck, none an orphan (parent alive).
            family = site(snap.sites, "family")
            assert (family.live, family.created, family.exited) == (fam_n, fam_n, 0)
            assert family.function == "main.familyChild"
            assert family.wait_reasons == {"chan receive": fam_n}
            assert family.orphans == 0, "children of a live parent are no orphans"
            members = _goids(snap, family)
            assert {snap.parents.get(g) for g in members} == {fam["parent_goid"]}
            assert site(snap.sites, "family-parent").live == 1

            # Populations born before attach: the inventory's live counts are exact.
            for marker, count, reason in (
                ("nilselect", COUNTS["nilselect"], "select"),
                ("condwait", COUNTS["condwait"], "sync.Cond.Wait"),
                ("sleeper", COUNTS["sleeper"], "sleep"),
            ):
                s = site(snap.sites, marker)
                assert s.live == count, marker
                assert s.created == 0, f"{marker} was born before attach"
                assert s.wait_reasons == {reason: count}, marker
                assert s.function == f"main.{marker}"
            workers = site(snap.sites, "worker")
            assert workers.live == COUNTS["worker"]

            # Orphans: every creator exited. The 30 born before attach have a known
            # parent from g.parentGoid on 1.21+ only; the 5 born while attached have
            # theirs from the probes on every version.
            orphans = site(snap.sites, "orphan")
            early = COUNTS["orphan"]
            assert (orphans.live, orphans.created) == (early + 5, 5)
            assert orphans.wait_reasons == {"chan receive": early + 5}
            known = early if has_parent_goid(toolchain) else 0
            assert orphans.orphans == known + 5
            parents = {snap.parents.get(g) for g in _goids(snap, orphans)}
            creators = set(pop.creator_goids) if known else {None}
            assert parents == creators | {late["creator_goid"]}
            # Healthy long-lived goroutines are never orphans.
            for marker in ("worker", "sleeper"):
                assert site(snap.sites, marker).orphans == 0
            assert snap.dropped == {
                "live_table_full": 0,
                "site_table_full": 0,
                "read_faults": 0,
                "stack_faults": 0,
            }
            # One hit per goroutine (two with lifetimes), each counted at its site. (The
            # runtime may start goroutines of its own meanwhile, e.g. GC mark workers.)
            hits = snap.probe_hits
            assert hits["create_hits"] == sum(s.created for s in snap.sites) >= n + fam_n + 7
            if lifetimes:
                assert hits["exit_hits"] == sum(s.exited for s in snap.sites) >= n + 1
            else:
                assert hits["exit_hits"] == 0
        finally:
            tracker.close()


@pytest.mark.parametrize("variant", ["default", "stripped", "pie"])
def test_counts_exact(toolchain: str, variant: str) -> None:
    check_counts(toolchain, variant)


def test_counts_exact_with_lifetimes(toolchain: str) -> None:
    """--lifetimes: the exit probe too; the same exact counts, and lifetimes."""
    check_counts(toolchain, "default", lifetimes=True)


@pytest.mark.parametrize("variant", ["trimpath", "cgo"])
@pytest.mark.parametrize("toolchain", [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]])
def test_counts_exact_trimpath_and_cgo(toolchain: str, variant: str) -> None:
    """Paths rewritten by -trimpath; a cgo binary (runtime/cgo, libc, threads made by
    pthread_create): the same probes, the same exact counts."""
    check_counts(toolchain, variant)


def _goids(snap, s: SiteSummary) -> set[int]:
    return {g.goid for g in snap.goroutines if (g.gopc, g.startpc) == (s.gopc, s.startpc)}


def test_parents_from_probes(toolchain: str) -> None:
    """Goroutines born while attached get their parent from the probe: from
    g.parentGoid on 1.21+, and on 1.19 (no such field) from g0.m.curg."""
    with populations(toolchain) as pop:
        proc = GoProcess.attach(pop.pid)
        tracker = ProcessTracker(proc, orphan_min_age_s=0)
        try:
            tracker.start()
            late = pop.command("orphans 6")
            born = tracker.probes.read().live
            children = [g for g in born.values() if g.parent_goid == late["creator_goid"]]
            assert len(children) == 6
            fname, line = gobuild.marker_line("populations", "orphan")
            assert {tracker.site_name(g.gopc, g.startpc) for g in children} == {
                ("main.orphan", tracker.site_name(children[0].gopc, children[0].startpc)[1])
            }
            assert tracker.site_name(children[0].gopc, children[0].startpc)[1].endswith(
                f"{fname}:{line}"
            )

            # Once the creator has exited, all its children are orphans (and on 1.21+
            # the populations born before attach too, from g.parentGoid).
            early = COUNTS["orphan"] if has_parent_goid(toolchain) else 0
            s = wait_for(
                lambda: (s := site(tracker.snapshot().sites, "orphan")).orphans >= early + 6 and s,
                "the late creator's children to count as orphans",
            )
            assert s.orphans == early + 6
        finally:
            tracker.close()


# Drop accounting does not depend on the Go version: the oldest and newest suffice.
@pytest.mark.parametrize("toolchain", [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]])
def test_map_too_small_counts_drops(toolchain: str) -> None:
    """With the exit probe a birth record lives until its exit: a table too small
    drops births, counted, and the site counts stay exact."""
    with populations(toolchain) as pop:
        proc = GoProcess.attach(pop.pid)
        unlimited = OverheadBudget(cpu_fraction=math.inf)  # the table's drops, not the governor's
        tracker = ProcessTracker(proc, max_live=16, lifetimes=True, budget=unlimited)
        try:
            tracker.start()
            n = 3000
            pop.command(f"churn {n}")

            def settled():
                snap = tracker.snapshot()
                c = site(snap.sites, "churn")
                return snap if c.exited + c.exited_unseen == n else None

            snap = wait_for(settled, "all churn exits counted")
            c = site(snap.sites, "churn")
            assert c.created == n, "site counts stay exact when the live table is full"
            assert snap.dropped["live_table_full"] > 0
            assert snap.dropped["live_table_full"] == c.exited_unseen
        finally:
            tracker.close()


def run_trace(pid: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "goleash.cli", "trace", "--pid", str(pid), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def test_cli_trace_json_and_exit_mid_trace() -> None:
    toolchain = gobuild.TOOLCHAINS[-1]
    with populations(toolchain) as pop:
        tr = run_trace(pop.pid, "--duration", "60", "--interval", "0.5", "--json")
        assert tr.stderr is not None
        wait_for(lambda: "tracing PID" in tr.stderr.readline(), "trace to attach")
        assert pop.command("churn 500") == {"churned": 500}
        assert pop.command("exit") == {"bye": True}
        out, err = tr.communicate(timeout=60)
        assert tr.returncode == 0, err
        assert "exited" in err
        result = json.loads(out)
        assert result["process_exited"] is True
        by_fn = {s["function"]: s for s in result["sites"]}
        assert by_fn["main.orphan"]["live"] == COUNTS["orphan"]
        assert {"function", "go_statement", "live", "created", "exited"} <= set(
            by_fn["main.orphan"]
        )
        assert {"live", "created", "exited"} <= set(result["totals"])


def test_output_unchanged_by_tracing() -> None:
    """The traced program prints exactly what it prints untraced."""
    toolchain = gobuild.TOOLCHAINS[-1]
    outputs = []
    for traced in (False, True):
        with populations(toolchain) as pop:
            tr = None
            if traced:
                tr = run_trace(pop.pid, "--duration", "60", "--interval", "0.5")
                assert tr.stderr is not None
                wait_for(lambda tr=tr: "tracing PID" in tr.stderr.readline(), "trace to attach")
            lines = [pop.command(c) for c in ("churn 3000", "churn 10", "exit")]
            assert pop.proc.wait(timeout=30) == 0
            outputs.append(lines)
            if tr is not None:
                tr.communicate(timeout=60)
                assert tr.returncode == 0
    assert outputs[0] == outputs[1]


def test_trace_refuses_non_go_process() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        tr = run_trace(p.pid, "--duration", "1")
        _, err = tr.communicate(timeout=30)
        assert tr.returncode == 2
        assert "not a Go binary" in err and "Traceback" not in err
    finally:
        p.kill()
        p.wait()


def test_trace_no_such_pid() -> None:
    tr = run_trace(4_000_000, "--duration", "1")
    _, err = tr.communicate(timeout=30)
    assert tr.returncode == 2 and "4000000" in err and "Traceback" not in err


@pytest.mark.parametrize("toolchain", [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]])
def test_creator_stacks(toolchain: str) -> None:
    """--stacks: each site born while attached carries its creator's stack, the
    function holding the `go` statement first (main.creator), then its caller."""
    with populations(toolchain) as pop:
        proc = GoProcess.attach(pop.pid)
        tracker = ProcessTracker(proc, stacks=True)
        try:
            tracker.start()
            pop.command("orphans 3")
            snap = tracker.snapshot()
            s = site(snap.sites, "orphan")
            fname, line = gobuild.marker_line("populations", "orphan")
            assert s.creator_stack, "no creator stack recorded"
            assert s.creator_stack[0].startswith("main.creator ")
            assert s.creator_stack[0].endswith(f"{fname}:{line}")
            assert snap.probe_hits["newproc_hits"] >= 3
            assert snap.dropped["stack_faults"] == 0
        finally:
            tracker.close()


def test_newproc1_return_fallback() -> None:
    """Where newproc's closure has no runqput call, the probes sit on every RET of
    newproc1 (RAX = the new g): counts stay exact there too."""
    from dataclasses import replace

    toolchain = gobuild.TOOLCHAINS[-1]
    with populations(toolchain) as pop:
        proc = GoProcess.attach(pop.pid)
        # Single-stepped RETs cost ~15x more a hit: let the budget allow them here.
        tracker = ProcessTracker(proc, budget=OverheadBudget(cpu_fraction=1.0))
        assert tracker.probes is not None and tracker.probes.sites.create_rets == []
        from goleash.gobin.disasm import return_sites

        addr, size = proc.symbols.require("runtime.newproc1")
        rets = return_sites(proc.binary, "runtime.newproc1", addr, size)
        tracker.probes.sites = replace(
            tracker.probes.sites, create_kind="newproc1_ret", create=None, create_rets=rets
        )
        try:
            tracker.start()
            pop.churn(500)

            def done():
                snap = tracker.snapshot()
                c = site(snap.sites, "churn")
                return snap if (c.created, c.exited) == (500, 500) else None

            snap = wait_for(done, "churn counted through newproc1's RETs")
            assert snap.probe_hits["create_hits"] == 500
            assert tracker.probes.stepped_sites == len(rets), "RET sites are single-stepped"
        finally:
            tracker.close()


def test_budget_falls_back_to_inventory_and_returns() -> None:
    """Over budget the probes detach and the memory inventory carries on (and says
    so); once the creation rate drops, the probes come back."""
    toolchain = gobuild.TOOLCHAINS[-1]
    with populations(toolchain) as pop:
        proc = GoProcess.attach(pop.pid)
        tracker = ProcessTracker(proc, budget=OverheadBudget(cpu_fraction=0.001))
        try:
            tracker.start()
            tracker.snapshot()
            pop.churn(20000)  # ~20k goroutines in well under a second: >> 0.1% of a core
            snap = tracker.snapshot()
            assert snap.mode == "inventory-only"
            assert "budget" in snap.mode_reason
            assert not tracker.probes.attached
            assert site(snap.sites, "orphan").live == COUNTS["orphan"], "inventory still counts"
            # Quiet now: the goid growth since the last snapshot is nil, so back on.
            snap = tracker.snapshot()
            assert snap.mode == "probes" and tracker.probes.attached
            pop.churn(10)
            snap = wait_for(
                lambda: (s := tracker.snapshot()) and s.probe_hits["create_hits"] >= 20010 and s,
                "probes counting again",
            )
        finally:
            tracker.close()


def test_sigterm_detaches_and_prints_summary() -> None:
    toolchain = gobuild.TOOLCHAINS[-1]
    with populations(toolchain) as pop:
        tr = run_trace(pop.pid, "--interval", "0.3")
        assert tr.stderr is not None and tr.stdout is not None
        wait_for(lambda: "tracing PID" in tr.stderr.readline(), "trace to attach")
        wait_for(lambda: "main.orphan" in tr.stdout.readline(), "a summary naming main.orphan")
        # Attached: int3 at the probe sites, held by uprobe fds of the tracer (perf
        # events or BPF links, which tracefs's uprobe_events does not list).
        assert int3_count(pop.pid) >= 1, "the create probe at least"
        assert uprobe_fds(tr.pid)
        tr.terminate()
        out, err = tr.communicate(timeout=30)
        assert tr.returncode == 0, err
        assert "Traceback" not in err
        assert "main.orphan" in out  # the summary printed on the way out
        # Detached: every probed byte is the file's byte again. (Seen under heavy CPU
        # load: int3 still there 5 s after the tracer exited 0, gone later; the
        # tracer detaches in a `finally`, so the kernel finishes the removal late.)
        wait_for(
            lambda: (b := goroutine_probe_bytes(pop.pid))[0] == b[1], "the int3 bytes restored", 30
        )
        # The traced program goes on, unchanged.
        pop.churn(100)
        assert pop.proc.poll() is None


def test_coroutines_not_born_through_newproc_are_seen() -> None:
    """iter.Pull coroutines (Go 1.23+) start without runqput: the probes never see
    them born, the memory inventory counts them all the same."""
    toolchain = gobuild.TOOLCHAINS[-1]
    with populations(toolchain, coroutine=6, orphan=3) as pop:
        proc = GoProcess.attach(pop.pid)
        tracker = ProcessTracker(proc)
        try:
            tracker.start()
            snap = tracker.snapshot()
            # Their site is the runtime's coroutine start inside iter.Pull.
            (site_,) = [s for s in snap.sites if s.function == "runtime.corostart"]
            assert site_.go_statement.endswith("iter/iter.go:" + site_.go_statement.split(":")[-1])
            assert (site_.live, site_.created, site_.wait_reasons) == (6, 0, {"coroutine": 6})
            assert site(snap.sites, "orphan").live == 3
        finally:
            tracker.close()


def test_perf_event_uprobes_where_the_kernel_has_no_uprobe_multi(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kernels before 6.6 refuse a program loaded for uprobe_multi links: the
    goroutine probes then go in as one perf-event uprobe per site, count alike, and
    leave when detached (as the budget governor detaches them, the program kept)."""
    from goleash.probes import bpfload, uprobe

    load_func = bpfload.LoadedBpf.load_func

    def old_kernel(
        self: bpfload.LoadedBpf, name: bytes, prog_type: int, attach_type: int = -1
    ) -> bpfload.Function:
        if attach_type == uprobe._BPF_TRACE_UPROBE_MULTI:
            raise OSError(22, "bpf(BPF_PROG_LOAD): Invalid argument")
        return load_func(self, name, prog_type, attach_type)

    monkeypatch.setattr(bpfload.LoadedBpf, "load_func", old_kernel)
    before = uprobe_fds(os.getpid())
    with populations(gobuild.TOOLCHAINS[-1]) as pop:
        tracker = ProcessTracker(GoProcess.attach(pop.pid))
        try:
            tracker.start()
            assert tracker.mode == "probes"
            held = set(uprobe_fds(os.getpid())) - set(before)
            assert held and all(h.endswith("perf_event") for h in held), held
            n = 300
            assert pop.command(f"churn {n}") == {"churned": n}

            def churn_done():
                s = site(tracker.snapshot().sites, "churn")
                return s if (s.created, s.live) == (n, 0) else None

            churn = wait_for(churn_done, "every churn goroutine counted and gone")
            assert churn.exited == n
            assert tracker.probes is not None
            tracker.probes.detach()
            assert uprobe_fds(os.getpid()) == before
        finally:
            tracker.close()
    assert uprobe_fds(os.getpid()) == before
