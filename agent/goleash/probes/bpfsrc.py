"""Where the BPF C sources are: package data (goleash/bpf), found through the
installed package, never through the checkout.

In a source tree goleash/bpf is a symlink to the top-level bpf/ directory (the one
copy of the C sources); a wheel carries the files themselves. BCC needs a real
directory (it is passed as `-I`), which both are.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from goleash.errors import GoleashError


class BpfSourcesMissing(GoleashError):
    """The package was installed without its BPF sources."""


def bpf_dir() -> Path:
    path = Path(str(files("goleash").joinpath("bpf")))
    if not (path / "goleash.h").is_file():
        raise BpfSourcesMissing(
            f"{path}/goleash.h is missing: goleash was installed without its BPF sources "
            "(reinstall from a wheel or sdist built by setuptools)"
        )
    return path
