"""Reading the same process again with the decode memo (what the agent does every
interval): the gs whose bytes did not change come back as the very same objects,
the ones that changed (born, exited, woken) are read as they are now. Real Go
programs, read from outside."""

from __future__ import annotations

import pytest

import gobuild
from goleash.probes.inventory import Goroutine, ReadMemo, read_goroutines
from goleash.probes.target import GoProcess
from populations import running_populations

pytestmark = pytest.mark.root


def parked(gs: list[Goroutine]) -> set[tuple[int, str, str | None, int, int]]:
    """What stays put between two reads of parked goroutines."""
    return {(g.goid, g.status, g.wait_reason, g.gopc, g.startpc) for g in gs if g.parked}


@pytest.mark.parametrize("toolchain", [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]])
def test_unchanged_gs_reused_changed_ones_read_again(toolchain: str) -> None:
    with (
        running_populations(toolchain, orphan=20, sleeper=3) as pop,
        GoProcess.attach(pop.pid) as proc,
    ):
        memo = ReadMemo()
        first = read_goroutines(proc, memo)
        assert len(memo.decoded) == first.allglen  # only this read's gs: bounded
        again = read_goroutines(proc, memo)
        by_goid = {g.goid: g for g in first.goroutines}
        reused = [g for g in again.goroutines if by_goid.get(g.goid) is g]
        orphans = [g for g in again.goroutines if g.wait_reason == "chan receive"]
        assert len(orphans) >= 20 and all(g in reused for g in orphans)
        assert parked(again.goroutines) == parked(read_goroutines(proc).goroutines)

        def born_since(before: list[Goroutine]) -> set[int]:
            pop.command("orphans 5")
            now = read_goroutines(proc, memo)
            assert parked(now.goroutines) == parked(read_goroutines(proc).goroutines)
            assert len(memo.decoded) == now.allglen
            return {g.goid for g in now.goroutines} - {g.goid for g in before}

        # Born since in new gs (allgs grew: its pointers read again) ...
        assert len(born_since(again.goroutines)) == 5
        # ... and, after a churn left dead gs, in those (the runtime reuses them): read
        # as they are now, not as the memo last saw those addresses.
        pop.churn(300)
        after_churn = read_goroutines(proc, memo)
        assert parked(after_churn.goroutines) == parked(read_goroutines(proc).goroutines)
        assert len(born_since(after_churn.goroutines)) == 5
