"""Commands that read a Go binary on disk: inspect, symbolize."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from goleash.cli.options import (
    _target_args,
    arg_address,
    print_json,
)
from goleash.errors import GoleashError

# --- inspect -----------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from goleash.gobin.report import inspect_path, render_text

    if (args.path is None) == (args.pid is None):
        raise GoleashError("give exactly one of PATH or --pid PID")
    if args.pid is not None:
        from goleash.probes.target import inspect_process

        report = inspect_process(args.pid)
    else:
        report = inspect_path(args.path)
    if args.json:
        print_json(report.to_dict())
    else:
        sys.stdout.write(render_text(report))
    return 0


def cmd_symbolize(args: argparse.Namespace) -> int:
    from goleash.gobin.report import symbolize

    rows = symbolize(args.path, args.pcs)
    if args.json:
        print_json([r.to_dict() for r in rows])
    else:
        for r in rows:
            where = f"{r.file}:{r.line}" if r.file else "?"
            print(f"{r.pc:#x}\t{r.function or '?'}\t{where}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="what goleash reads from a Go binary: version, offsets, probe sites",
        description=(
            "Read a Go executable without running it and report its Go version, build "
            "settings, where symbols came from, the runtime struct offsets the probes use "
            "and the instruction sites they would attach at. Exit 2 if goleash cannot "
            "trace it (not Go, Go < 1.17, stripped with an unknown version)."
        ),
        epilog="examples:\n  goleash inspect ./server\n  goleash inspect --pid 4242 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _target_args(p, path=True)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser(
        "symbolize",
        help="PC -> function and file:line, from the binary's pclntab",
        description="Symbolize program counters (link-time addresses) with the binary's pclntab.",
    )
    p.add_argument("path", help="Go executable")
    p.add_argument(
        "pcs", nargs="+", type=arg_address, metavar="PC", help="addresses, e.g. 0x4a1b2c"
    )
    p.add_argument("--json", action="store_true", help="a JSON list on stdout")
    p.set_defaults(handler=cmd_symbolize)
