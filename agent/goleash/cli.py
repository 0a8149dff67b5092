"""The one `goleash` command.

Each subcommand is a small function taking parsed args and returning an exit code;
the work itself lives in the packages (gobin, probes, node, control). Exit codes:
0 success, 1 the check a command makes failed (e.g. leaks found where asked to
fail on them), 2 bad input or an environment goleash cannot work in (message on
stderr, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from goleash import __version__
from goleash.errors import GoleashError

Handler = Callable[[argparse.Namespace], int]


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _target_args(p: argparse.ArgumentParser, *, path: bool) -> None:
    """PATH or --pid PID: the binary on disk, or the one a running process executes."""
    if path:
        p.add_argument("path", nargs="?", help="Go executable to read")
    p.add_argument("--pid", type=int, help="read the executable of this running process")


# --- inspect -----------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from goleash.gobin.report import inspect_path, inspect_pid, render_text

    if (args.path is None) == (args.pid is None):
        raise GoleashError("give exactly one of PATH or --pid PID")
    report = inspect_pid(args.pid) if args.pid is not None else inspect_path(args.path)
    if args.json:
        print_json(report.to_dict())
    else:
        sys.stdout.write(render_text(report))
    return 0


def cmd_symbolize(args: argparse.Namespace) -> int:
    from goleash.gobin.report import symbolize

    rows = symbolize(args.path, [int(pc, 0) for pc in args.pcs])
    if args.json:
        print_json([r.to_dict() for r in rows])
    else:
        for r in rows:
            where = f"{r.file}:{r.line}" if r.file else "?"
            print(f"{r.pc:#x}\t{r.function or '?'}\t{where}")
    return 0


# --- trace -----------------------------------------------------------------------


def cmd_trace(args: argparse.Namespace) -> int:
    from goleash.node.trace import run_trace

    return run_trace(
        args.pid,
        duration=args.duration,
        interval=args.interval,
        stacks=args.stacks,
        as_json=args.json,
        budget_fraction=args.budget,
        max_live=args.max_live,
        emit_json=print_json,
    )


# --- dump --------------------------------------------------------------------------


def cmd_dump(args: argparse.Namespace) -> int:
    from goleash.probes.dump import build_dump, dump_to_dict, render_text
    from goleash.probes.target import GoProcess

    with GoProcess.attach(args.pid) as proc:
        dump = build_dump(proc, system=args.system)
    if args.json:
        print_json(dump_to_dict(dump))
        return 0
    sys.stdout.write(render_text(dump, system=args.system))
    hidden = f", {dump.hidden_system} runtime goroutines hidden" if dump.hidden_system else ""
    torn = f", {dump.torn} changed while read and skipped" if dump.torn else ""
    print(
        f"goleash dump: PID {dump.pid} ({dump.go_version}): {len(dump.entries)} goroutines"
        f"{hidden}{torn}, read in {dump.read_ms:.1f} ms without stopping it",
        file=sys.stderr,
    )
    return 0


# --- the parser ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goleash",
        description=(
            "Watch Go services from the outside: goroutine lifetimes, leaks and function "
            "latency via eBPF uprobes and process memory. No code change, no restart."
        ),
        epilog="Run `goleash COMMAND --help` for the details of each command.",
    )
    parser.add_argument("--version", action="version", version=f"goleash {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument("pcs", nargs="+", metavar="PC", help="addresses, e.g. 0x4a1b2c")
    p.add_argument("--json", action="store_true", help="a JSON list on stdout")
    p.set_defaults(handler=cmd_symbolize)

    p = sub.add_parser(
        "dump",
        help="goroutine dump of a running process, read from its memory",
        description=(
            "Print every goroutine of a running Go process with its state, how long it has "
            "been blocked, its stack and where it was created, in the format of "
            "runtime.Stack / pprof goroutine?debug=2. Read from the process's memory: the "
            "process is not stopped, signalled or changed, and needs no pprof endpoint. "
            "Stacks of goroutines running on a CPU cannot be read from outside. Needs root "
            "(or CAP_SYS_PTRACE). Exit 2 if the PID is not a Go program goleash can read."
        ),
        epilog="examples:\n  goleash dump --pid 4242\n  goleash dump --pid 4242 --json | jq .",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pid", type=int, required=True, help="process to read")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument(
        "--system",
        action="store_true",
        help="also the runtime's own goroutines and runtime frames (as GOTRACEBACK=system)",
    )
    p.set_defaults(handler=cmd_dump)

    p = sub.add_parser(
        "trace",
        help="live goroutine summary of one process, per creation site",
        description=(
            "Track every goroutine of a running Go process from birth to exit with BPF "
            "uprobes (two probe hits per goroutine) and read the live set from its memory. "
            "Prints, every interval, per creation site (started function + `go` statement): "
            "live, created, exited, ages and what they are blocked on. Needs root."
        ),
        epilog=(
            "examples:\n  goleash trace --pid 4242\n"
            "  goleash trace --pid 4242 --duration 30 --json > sites.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pid", type=int, required=True, help="process to trace")
    p.add_argument("--duration", type=float, help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between summaries")
    p.add_argument(
        "--stacks", action="store_true", help="also record each creator's stack (one more hit)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.01,
        help="max share of one core the probes may cost the process (default 0.01 = 1%%)",
    )
    p.add_argument("--max-live", type=int, help="size of the kernel's live-goroutine table")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=cmd_trace)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except GoleashError as exc:
        print(f"goleash {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
