"""The parts of `goleash dump`'s text a live test cannot reach in seconds: minutes
blocked, running goroutines, and Go < 1.21's "created by" without a goroutine."""

from __future__ import annotations

from goleash.probes.dump import DumpEntry, render_entry
from goleash.probes.inventory import Goroutine
from goleash.probes.stacks import Frame, Stack


def entry(status: str, reason: str | None, minutes: int, parent: int | None) -> DumpEntry:
    g = Goroutine(
        goid=18,
        parent_goid=parent,
        status=status,
        wait_reason=reason,
        wait_since_ns=1,
        gopc=0x401045,
        startpc=0x401000,
        g_addr=0xC000001000,
        sched_pc=0x401125,
        sched_sp=0xC000100F00,
        sched_bp=0xC000100F20,
        stack_lo=0xC000100000,
        stack_hi=0xC000101000,
        status_code={"waiting": 4, "running": 2}[status],
    )
    frames = [
        Frame(0x401125, "runtime.gopark", "/go/src/runtime/proc.go", 402, 0x401100),
        Frame(0x401225, "main.leak", "/src/app/main.go", 12, 0x401200, inlined=True),
        Frame(0x401225, "main.serve", "/src/app/main.go", 20, 0x401200),
    ]
    return DumpEntry(
        g=g,
        stack=Stack(frames, True),
        wait_minutes=minutes,
        system=False,
        created_by="main.spawner",
        created_at="/src/app/main.go:30",
        created_offset=0x45,
        start_function="main.serve",
    )


def test_blocked_for_minutes_with_parent() -> None:
    text = render_entry(entry("waiting", "chan receive", 5, 7))
    assert text == (
        "goroutine 18 [chan receive, 5 minutes]:\n"
        "main.leak(...)\n\t/src/app/main.go:12\n"
        "main.serve(...)\n\t/src/app/main.go:20 +0x25\n"
        "created by main.spawner in goroutine 7\n\t/src/app/main.go:30 +0x45\n"
    )


def test_under_a_minute_and_before_go_1_21() -> None:
    text = render_entry(entry("waiting", "chan receive", 0, None), parent_goids=False)
    assert text.startswith("goroutine 18 [chan receive]:\n")
    assert "created by main.spawner\n\t/src/app/main.go:30 +0x45\n" in text


def test_running_goroutine_says_its_stack_is_unavailable() -> None:
    text = render_entry(entry("running", None, 0, 7))
    assert text == (
        "goroutine 18 [running]:\n"
        "\tgoroutine running on other thread; stack unavailable\n"
        "created by main.spawner in goroutine 7\n\t/src/app/main.go:30 +0x45\n"
    )


def test_runtime_frames_only_with_system() -> None:
    e = entry("waiting", "chan receive", 0, 7)
    assert "runtime.gopark" not in render_entry(e)
    assert "runtime.gopark(...)\n\t/go/src/runtime/proc.go:402 +0x25\n" in render_entry(
        e, system=True
    )
