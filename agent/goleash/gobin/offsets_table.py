"""Regenerate offsets_table.json from the DWARF of every toolchain the project tests with.

    python -m goleash.gobin.offsets_table     (or: make offsets-table)

For each toolchain in scripts/go-toolchains.txt it builds the spawner fixture with
DWARF, reads the runtime offsets from it and writes one row per release line. Needs
the toolchains installed (`make setup`) and a source checkout (it uses tests/gobuild.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from goleash.gobin.binary import GoBinary
from goleash.gobin.offsets import TABLE_PATH, go_release, runtime_offsets

REPO = Path(__file__).resolve().parents[3]


def _gobuild() -> ModuleType:
    # The fixture builder lives with the tests, not in the installed package.
    spec = importlib.util.spec_from_file_location("gobuild", REPO / "tests" / "gobuild.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{REPO / 'tests' / 'gobuild.py'}: needs a source checkout")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toolchain_version(gobuild: ModuleType, toolchain: str) -> str:
    """The exact version a toolchain reports ("1.19" in the list may be go1.19.8)."""
    go = gobuild.go_root(toolchain) / "bin" / "go"
    out = subprocess.run(
        [str(go), "env", "GOVERSION"],
        env=gobuild.go_env(toolchain),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def generate() -> dict[str, dict[str, Any]]:
    gobuild = _gobuild()
    table: dict[str, dict[str, Any]] = {}
    for toolchain in gobuild.TOOLCHAINS:
        version = toolchain_version(gobuild, toolchain)
        release = go_release(version)
        if release is None:
            raise ValueError(f"toolchain {toolchain} reports {version!r}, not a Go release")
        with GoBinary(gobuild.build("spawner", toolchain, "default")) as binary:
            offsets = runtime_offsets(binary, version)
        if offsets.source != "dwarf":
            raise RuntimeError(f"{version}: the fixture build has no DWARF to read")
        row = {"generated_from": version, **offsets.as_row()}
        previous = table.get(release)
        if previous is not None and offsets.as_row() != {
            k: v for k, v in previous.items() if k != "generated_from"
        }:
            # The table's premise (one layout per release line) would be false.
            raise RuntimeError(
                f"{version} and {previous['generated_from']} differ in runtime layout"
            )
        table[release] = row
        print(f"{release}: from {version}", file=sys.stderr)
    return dict(sorted(table.items(), key=lambda kv: tuple(map(int, kv[0][2:].split(".")))))


def main() -> None:
    table = generate()
    TABLE_PATH.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {TABLE_PATH} ({len(table)} release lines)", file=sys.stderr)


if __name__ == "__main__":
    main()
