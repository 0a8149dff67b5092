"""What shows that uprobes are in a process, and that they are gone.

goleash attaches uprobes with perf_event_open (one perf-event fd per site) or as
uprobe_multi BPF links (a bpf-link fd per group): neither is listed in
/sys/kernel/tracing/uprobe_events, which only shows probes made through tracefs, so
an empty uprobe_events proves nothing. The proof is in two places:

- the traced process's code: the kernel writes int3 (0xcc) into the process's copy of
  each probed page and restores the original byte when the last probe there goes, so
  the bytes at the probe sites equal the file's exactly when no probe is left;
- the tracer's descriptors: each probe lives as long as the fd holding it.
"""

from __future__ import annotations

import os
from pathlib import Path

from goleash.gobin.disasm import goroutine_probe_sites
from goleash.probes.target import GoProcess


def goroutine_probe_bytes(pid: int) -> tuple[list[int], list[int]]:
    """(bytes in the process, bytes in the file) at the goroutine probes' sites, as
    goleash's own disassembly places them."""
    with GoProcess.attach(pid) as proc:
        sites = goroutine_probe_sites(proc.binary, proc.symbols.lookup)
        where = [s for s in (sites.create, sites.exit, *sites.create_rets) if s is not None]
        live = [proc.memory.read(s.vaddr + proc.load_bias, 1)[0] for s in where]
        disk = [proc.binary.read(s.vaddr, 1)[0] for s in where]
    assert 0xCC not in disk, "an int3 in the file itself: the sites are not what they seem"
    return live, disk


def int3_count(pid: int) -> int:
    live, _disk = goroutine_probe_bytes(pid)
    return live.count(0xCC)


def uprobe_fds(pid: int) -> list[str]:
    """The fds of `pid` that hold uprobes: perf events, and uprobe BPF links (their
    fdinfo names the link type). Empty once the process has exited."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return []
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
            if target == "anon_inode:[perf_event]":
                out.append(f"{fd}: perf_event")
            elif target == "anon_inode:bpf_link":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                kind = next(
                    (ln.split(":", 1)[1].strip() for ln in info.splitlines()
                     if ln.startswith("link_type:")),
                    "",
                )  # fmt: skip
                if "uprobe" in kind or kind == "perf":
                    out.append(f"{fd}: bpf_link {kind}")
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed while we looked
    return out
