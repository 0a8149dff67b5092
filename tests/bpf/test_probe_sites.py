"""The goroutine create and exit sites, attached for real to a running spawner.

The spawner starts 2 goroutines every 50 ms that exit at once. With a uprobe on the
`call runtime.runqput` in runtime.newproc.func1 (new g in RBX) and on goexit1's site
(exiting g in R14), every goid seen created must then be seen exiting, each exactly
once: a site before the stack check, or in a loop, would count some twice.
"""

from __future__ import annotations

import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import gobuild
from goleash.gobin.binary import GoBinary
from goleash.gobin.disasm import goroutine_probe_sites

pytestmark = pytest.mark.root

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>

BPF_HASH(startpc, u64, u64, 65536);  // goid -> g.startpc, at creation
BPF_HASH(created, u64, u64, 65536);  // goid -> times seen created
BPF_HASH(exited, u64, u64, 65536);   // goid -> times seen exiting

static __always_inline u64 read_u64(u64 addr) {
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)addr);
    return v;
}

int on_create(struct pt_regs *ctx) {
    u64 goid = read_u64(ctx->bx + GOID_OFFSET);
    u64 pc = read_u64(ctx->bx + STARTPC_OFFSET);
    startpc.update(&goid, &pc);
    created.increment(goid);
    return 0;
}

int on_exit(struct pt_regs *ctx) {
    exited.increment(read_u64(ctx->r14 + GOID_OFFSET));
    return 0;
}
"""

CASES = [
    (gobuild.TOOLCHAINS[0], "default"),
    (gobuild.TOOLCHAINS[0], "pie"),
    (gobuild.TOOLCHAINS[-1], "default"),
    (gobuild.TOOLCHAINS[-1], "pie"),
]


def g_offsets(binary: GoBinary, *fields: str) -> dict[str, int]:
    """Field offsets of runtime.g from the binary's own DWARF (types hang off CU tops)."""
    for cu in binary.elf.get_dwarf_info().iter_CUs():
        for die in cu.get_top_DIE().iter_children():
            name = die.attributes.get("DW_AT_name")
            if die.tag != "DW_TAG_structure_type" or name is None or name.value != b"runtime.g":
                continue
            out = {}
            for member in die.iter_children():
                mname = member.attributes.get("DW_AT_name")
                if member.tag == "DW_TAG_member" and mname is not None:
                    out[mname.value.decode()] = member.attributes[
                        "DW_AT_data_member_location"
                    ].value
            return {f: int(out[f]) for f in fields}
    raise AssertionError("runtime.g not in DWARF")


def load_bias(pid: int, path: Path, binary: GoBinary) -> int:
    """Run-time address minus link-time address of the executable's mappings."""
    first = min(binary.segments, key=lambda s: s.offset)
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path) and int(fields[2], 16) == first.offset:
            return int(fields[0].split("-")[0], 16) - (first.vaddr & ~0xFFF)
    raise AssertionError(f"{path} is not mapped in {pid}")


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise AssertionError(f"spawner printed no full line in time (got {line!r})")
        chunk = proc.stdout.read1(1)  # type: ignore[attr-defined]
        if not chunk:
            raise AssertionError(f"spawner exited with {proc.wait()}")
        line += chunk
    return line.decode()


@contextmanager
def running_spawner(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([str(path), "-wait"], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not read_line(proc, deadline).startswith("ready"):
            pass
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("toolchain, variant", CASES, ids=[f"go{t}-{v}" for t, v in CASES])
def test_created_goroutines_are_seen_exiting(toolchain: str, variant: str) -> None:
    from bcc import BPF  # Debian's python3-bpfcc

    path = gobuild.build("spawner", toolchain, variant)
    binary = GoBinary(path)
    assert binary.is_pie == (variant == "pie")
    sites = goroutine_probe_sites(binary, binary.elf_symbols.get)
    assert sites.create is not None and sites.create.emulated and sites.exit.emulated

    offsets = g_offsets(binary, "goid", "startpc")
    # `go worker(...)` starts main.worker or, as Go wraps calls with arguments, a closure
    # of main.spawn; those goroutines are the spawner's, every other is the runtime's.
    spawned_by_main = {
        a
        for n, (a, _) in binary.elf_symbols.items()
        if n == "main.worker" or n.startswith("main.spawn.")
    }
    assert spawned_by_main

    with running_spawner(path) as proc:
        bpf = BPF(
            text=BPF_TEXT,
            cflags=[f"-DGOID_OFFSET={offsets['goid']}", f"-DSTARTPC_OFFSET={offsets['startpc']}"],
        )
        try:
            for site, fn in ((sites.create, b"on_create"), (sites.exit, b"on_exit")):
                # BCC's addr= is a link-time vaddr (PIE too: Go links PIE at 0x400000);
                # it maps it through PT_LOAD itself, to the offset disasm computed.
                _, offset = BPF._check_path_symbol(bytes(path), b"", site.vaddr, proc.pid)
                assert offset == site.file_offset
                bpf.attach_uprobe(name=bytes(path), addr=site.vaddr, fn_name=fn, pid=proc.pid)

            # a PIE runs at a random base: g.startpc is a run-time address
            bias = load_bias(proc.pid, path, binary)
            deadline = time.monotonic() + 15
            while True:
                starts = {k.value: v.value for k, v in bpf[b"startpc"].items()}
                workers = {g for g, pc in starts.items() if pc - bias in spawned_by_main}
                exited = {k.value: v.value for k, v in bpf[b"exited"].items()}
                if len(workers & exited.keys()) >= 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            created = {k.value: v.value for k, v in bpf[b"created"].items()}
        finally:
            bpf.cleanup()
        assert proc.poll() is None, "the probed spawner died"

    assert len(workers & exited.keys()) >= 20, f"workers {sorted(workers)}, exited {sorted(exited)}"
    assert 0 not in created and 0 not in exited  # a wrong register or offset reads 0s
    assert set(created.values()) == {1}, "a goroutine was counted created twice"
    assert set(exited.values()) == {1}, "a goroutine was counted exiting twice"
    # spawn(2) waits for its 2 workers before the next round, so only the current round
    # may still be running (goids come from per-P batches: "newest" is not "largest")
    assert len(workers - exited.keys()) <= 2, sorted(workers - exited.keys())
