"""A goroutine dump of a running Go process, read from outside, in the runtime's format.

The text is what `runtime.Stack(buf, true)` (and so pprof's `goroutine?debug=2`)
prints, so it reads like any Go dump and existing tools parse it:

    goroutine 18 [chan receive, 5 minutes]:
    main.leak(...)
    \t/src/app/main.go:12 +0x25
    created by main.spawner in goroutine 7
    \t/src/app/main.go:30 +0x45

as traceback.go goroutineheader / printcreatedby1 write it: the wait reason in place
of "waiting"; minutes only from 1 up; "in goroutine N" from Go 1.21 (when g has a
parentGoid); the `+0x` offset only for a PC past the function entry. What differs:
arguments are always `(...)` (their values are in registers we cannot see); a
running goroutine's stack
cannot be read from outside (the runtime prints the same line for a goroutine on
another thread). As at GOTRACEBACK's default level, runtime-internal frames and the
runtime's own goroutines are left out unless `system` is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from goleash.probes.creation import creation_site_of, is_system_goroutine
from goleash.probes.inventory import Goroutine, read_goroutines
from goleash.probes.stacks import Frame, Stack, walk_stacks
from goleash.probes.target import GoProcess
from goleash.profiles import (
    DUMP_SCHEMA,
    ProfileFrame,
    StackSample,
    goroutine_json,
)

_NS_PER_MIN = 60_000_000_000


@dataclass(frozen=True)
class DumpEntry:
    g: Goroutine
    stack: Stack
    wait_minutes: int
    system: bool
    created_by: str  # function holding the go statement ("" for goroutine 1)
    created_at: str  # its "file:line"
    created_offset: int  # gopc - entry of created_by
    start_function: str


@dataclass(frozen=True)
class Dump:
    pid: int
    exe: str
    go_version: str
    read_ns: int
    read_ms: float
    torn: int
    entries: list[DumpEntry]
    hidden_system: int
    parent_goids: bool  # Go 1.21+: "created by F in goroutine N"


def _show_frame(name: str, system: bool) -> bool:
    """traceback.go showfuncinfo at level 1: hide runtime internals, keep exported
    runtime functions (runtime.Gosched) and, with `system`, everything."""
    if system:
        return True
    if not name.startswith("runtime."):
        return "." in name
    rest = name[len("runtime.") :]
    return rest[:1].isupper()


def build_dump(proc: GoProcess, *, system: bool = False) -> Dump:
    """Read every goroutine and walk the stacks of those not running."""
    inv = read_goroutines(proc)
    keep: list[Goroutine] = []
    hidden = 0
    flags: dict[int, bool] = {}
    for g in inv.goroutines:
        flags[g.goid] = sys_g = is_system_goroutine(proc, g)
        if sys_g and not system:
            hidden += 1
            continue
        keep.append(g)
    stacks = walk_stacks(proc, keep)
    entries: list[DumpEntry] = []
    for g in keep:
        site = creation_site_of(proc, g)
        minutes = 0
        if g.status in ("waiting", "syscall") and g.wait_since_ns:
            minutes = max(0, (inv.read_ns - g.wait_since_ns) // _NS_PER_MIN)
        offset = 0
        if g.gopc:
            f = proc.pclntab.func_for_pc(g.gopc)
            offset = g.gopc - f.entry if f else 0
        entries.append(
            DumpEntry(
                g=g,
                stack=stacks[g.goid],
                wait_minutes=minutes,
                system=flags[g.goid],
                created_by="" if g.goid == 1 else site.created_by,
                created_at="" if g.goid == 1 else site.go_statement,
                created_offset=offset,
                start_function=site.function,
            )
        )
    return Dump(
        pid=proc.pid,
        exe=proc.exe_name,
        go_version=proc.go_version,
        read_ns=inv.read_ns,
        read_ms=inv.read_ms,
        torn=inv.torn,
        entries=entries,
        hidden_system=hidden,
        parent_goids=proc.offsets.g_parent_goid is not None,
    )


def _status_text(e: DumpEntry) -> str:
    g = e.g
    status = g.wait_reason if g.wait_reason else g.status
    if g.status == "leaked":
        status += " (leaked)"
    if g.status_code & 0x1000:
        status += " (scan)"
    if e.wait_minutes >= 1:
        status += f", {e.wait_minutes} minutes"
    return status


def _frame_lines(fr: Frame) -> str:
    # An inlined call has no PC of its own: the runtime prints no offset for it.
    off = f" +{fr.offset:#x}" if fr.offset > 0 and not fr.inlined else ""
    return f"{fr.function}(...)\n\t{fr.file}:{fr.line}{off}\n"


def render_entry(e: DumpEntry, *, system: bool = False, parent_goids: bool = True) -> str:
    out = [f"goroutine {e.g.goid} [{_status_text(e)}]:\n"]
    if e.g.status == "running":
        out.append("\tgoroutine running on other thread; stack unavailable\n")
    else:
        out.extend(_frame_lines(fr) for fr in e.stack.frames if _show_frame(fr.function, system))
        if e.stack.note and not e.stack.complete:
            out.append(f"\t(goleash: {e.stack.note})\n")
    if e.created_by:
        parent = e.g.parent_goid
        who = f" in goroutine {parent}" if parent_goids and parent else ""
        off = f" +{e.created_offset:#x}" if e.created_offset > 0 else ""
        out.append(f"created by {e.created_by}{who}\n\t{e.created_at}{off}\n")
    return "".join(out)


def render_text(dump: Dump, *, system: bool = False) -> str:
    """The whole dump: one block per goroutine, separated by blank lines."""
    return "\n".join(
        render_entry(e, system=system, parent_goids=dump.parent_goids) for e in dump.entries
    )


def _profile_frames(e: DumpEntry) -> tuple[ProfileFrame, ...]:
    frames = tuple(
        ProfileFrame(fr.function, fr.file, fr.line, fr.pc, fr.inlined) for fr in e.stack.frames
    )
    # A running goroutine's stack cannot be read from outside: count it under the
    # function it started in rather than drop it from the profile.
    return frames or (ProfileFrame(e.start_function or "?"),)


def dump_samples(dump: Dump) -> list[StackSample]:
    """The dump as profile samples (one per goroutine, every frame kept, as Go's own
    goroutine profile keeps runtime frames), labelled with the goroutine's state."""
    return [
        StackSample(_profile_frames(e), 1, (("state", e.g.wait_reason or e.g.status),))
        for e in dump.entries
    ]


def dump_to_dict(dump: Dump) -> dict[str, Any]:
    """`dump --json` (schema in profiles.goroutine_json), plus what only a read of
    the process's memory knows: the executable, Go version and read cost."""
    return {
        "schema": DUMP_SCHEMA,
        "source": "process",
        "pid": dump.pid,
        "exe": dump.exe,
        "go_version": dump.go_version,
        "read_ns": dump.read_ns,
        "read_ms": round(dump.read_ms, 3),
        "torn": dump.torn,
        "hidden_system": dump.hidden_system,
        "goroutines": [
            goroutine_json(
                goid=e.g.goid,
                parent_goid=e.g.parent_goid,
                state=e.g.status,
                wait_reason=e.g.wait_reason,
                blocked_seconds=(
                    max(0, dump.read_ns - e.g.wait_since_ns) / 1e9
                    if e.g.status in ("waiting", "syscall") and e.g.wait_since_ns
                    else None
                ),
                # no probe saw it born: its age is not known from memory alone
                age_seconds=None,
                age_is_lower_bound=False,
                start_function=e.start_function,
                created_by=e.created_by,
                go_statement=e.created_at,
                orphan=None,
                system=e.system,
                frames=[
                    ProfileFrame(fr.function, fr.file, fr.line, fr.pc, fr.inlined)
                    for fr in e.stack.frames
                ],
                stack_complete=e.stack.complete,
                stack_note=e.stack.note,
                service=None,
                pid=dump.pid,
                agent_id=None,
            )
            for e in dump.entries
        ],
    }
