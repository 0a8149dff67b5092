"""Run the benchmark sections: `python -m goleash.bench [SECTION ...]`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

from goleash.bench import Report

SECTIONS = [
    "goroutines",
    "funclat",
    "service",
    "fleet",
    "funcfleet",
    "ingest",
    "check",
    "hostile",
    "gobin",
]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m goleash.bench")
    ap.add_argument("sections", nargs="*", default=SECTIONS, help=f"any of {SECTIONS}")
    ap.add_argument("--out", default="out/bench.json", help="where the JSON report goes")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (uprobes)", file=sys.stderr)
        return 2
    report = Report()
    failed = []
    for name in args.sections:
        try:
            mod = importlib.import_module(f"goleash.bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"[{name}] skipped: {exc}")
            continue
        print(f"[{name}]", flush=True)
        report.section = name
        try:
            mod.run(report)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    report.write(Path(args.out))
    print(f"report written to {args.out}")
    if failed:
        print(f"sections failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
