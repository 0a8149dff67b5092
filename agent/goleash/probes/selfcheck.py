"""Can this host run goleash's probes at all? Compile and load a trivial BPF program.

Compiling needs BCC and kernel headers; loading needs the privileges (root,
CAP_BPF/CAP_PERFMON). The agent runs this once at start: its readiness says whether
probes can be placed before any Go process shows up, and a failure comes with a
message a user can act on instead of one per traced process.
"""

from __future__ import annotations

from goleash.errors import GoleashError

_PROGRAM = b"int goleash_selfcheck(void *ctx) { return 0; }\n"


class BPFUnavailableError(GoleashError):
    """BPF programs cannot be compiled or loaded on this host."""


def check_bpf() -> None:
    """Raise BPFUnavailableError with the reason if a uprobe program cannot be loaded."""
    try:
        from bcc import BPF  # probes is the only package that imports bcc
    except ImportError as exc:
        raise BPFUnavailableError(
            f"BCC's Python module is not importable ({exc}); install python3-bpfcc and run "
            "goleash from a virtualenv made with --system-site-packages"
        ) from None
    try:
        b = BPF(text=_PROGRAM)
        try:
            b.load_func(b"goleash_selfcheck", BPF.KPROBE)
        finally:
            b.cleanup()
    except Exception as exc:  # BCC raises bare Exception for compile and load errors
        raise BPFUnavailableError(
            f"cannot compile or load a BPF program ({str(exc).strip()[:300]}); goleash needs "
            "root (or CAP_BPF + CAP_PERFMON) and kernel headers under "
            "/lib/modules/$(uname -r)/build"
        ) from None
