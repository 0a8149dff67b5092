"""Can this host run goleash's probes at all? Load a trivial BPF program.

Loading needs the privileges (root, CAP_BPF/CAP_PERFMON); attaching needs BCC's
libbcc_bpf. The agent runs this once at start: its readiness says whether probes
can be placed before any Go process shows up, and a failure comes with a message a
user can act on instead of one per traced process.

Nothing is compiled here: the agent's programs come from the image cache when it is
warm (probes/bpfimage.py), and a compile would map LLVM and clang into the agent
(~64 MB) for a two-instruction program. Whether BCC can compile (kernel headers) is
told by the first compile itself, once for every process (goroutine_program.py).
"""

from __future__ import annotations

import importlib.util
import os

from goleash.errors import GoleashError
from goleash.probes.uprobe import libbcc_bpf, load_empty_program


class BPFUnavailableError(GoleashError):
    """BPF programs cannot be compiled or loaded on this host."""


def check_bpf() -> None:
    """Raise BPFUnavailableError with the reason if a uprobe program cannot be loaded."""
    if importlib.util.find_spec("bcc") is None:
        raise BPFUnavailableError(
            "BCC's Python module is not importable; install python3-bpfcc and run "
            "goleash from a virtualenv made with --system-site-packages"
        )
    try:
        libbcc_bpf()
        os.close(load_empty_program())
    except OSError as exc:
        raise BPFUnavailableError(
            f"cannot load a BPF program ({str(exc).strip()[:300]}); goleash needs "
            "root (or CAP_BPF + CAP_PERFMON)"
        ) from None
