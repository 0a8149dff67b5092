"""Commands that trace or read one process on this host: dump, trace, latency, panics
(latency and dump also ask the control plane when no local process is named)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from goleash.cli.options import (
    BUDGET_HELP,
    _client,
    _server_args,
    arg_pid,
    arg_seconds,
    budget_arg,
    print_json,
)
from goleash.errors import GoleashError

# --- trace -----------------------------------------------------------------------


def _require_live(pid: int) -> None:
    """Fail at once on a PID that is not there, before seconds of imports (the
    tracker's) on a loaded host; later failures (the process exits while we attach)
    are still handled where they happen."""
    from goleash.probes.procmem import check_pid

    check_pid(pid)


def cmd_trace(args: argparse.Namespace) -> int:
    _require_live(args.pid)
    from goleash.node.trace import run_trace

    return run_trace(
        args.pid,
        duration=args.duration,
        interval=args.interval,
        stacks=args.stacks,
        as_json=args.json,
        budget_fraction=args.budget,
        max_live=args.max_live,
        lifetimes=args.lifetimes,
        emit_json=print_json,
    )


# --- latency, panics -----------------------------------------------------------------


def cmd_latency(args: argparse.Namespace) -> int:
    if args.pid is None:
        return _latency_from_server(args)
    from goleash.node.latency import run_latency

    return run_latency(
        args.pid,
        args.func,
        duration=args.duration,
        interval=args.interval,
        as_json=args.json,
        budget_fraction=args.budget,
        emit_json=print_json,
    )


def cmd_panics(args: argparse.Namespace) -> int:
    _require_live(args.pid)
    from goleash.node.latency import run_panics

    return run_panics(args.pid, duration=args.duration, as_json=args.json, emit_json=print_json)


# --- dump --------------------------------------------------------------------------


def _remote(args: argparse.Namespace) -> bool:
    """Ask the control plane (not this host's process memory) when a control plane
    option was given, or nothing names a local process."""
    return bool(args.server or args.service) or args.pid is None


DUMP_FORMATS = ("text", "json", "pprof", "folded")


def _dump_format(args: argparse.Namespace) -> str:
    fmt = args.format or ("json" if args.json else "text")
    if args.json and fmt != "json":
        raise GoleashError(f"--json and --format {fmt} disagree: give one")
    return fmt


def _write_profile(args: argparse.Namespace, fmt: str, samples: Any, **meta: Any) -> None:
    """pprof (gzipped protobuf) or folded stacks, to --output or stdout."""
    import time

    from goleash import profiles

    if fmt == "pprof":
        data = profiles.pprof_goroutine_profile(samples, time_ns=time.time_ns(), **meta)
    else:
        data = profiles.folded_text(samples).encode()
    if args.output and args.output != "-":
        try:
            with open(args.output, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise GoleashError(f"cannot write {args.output}: {exc.strerror}") from exc
        return
    if fmt == "pprof" and sys.stdout.isatty():
        raise GoleashError("a pprof profile is binary: give -o FILE or redirect stdout")
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def cmd_dump(args: argparse.Namespace) -> int:
    fmt = _dump_format(args)
    if _remote(args):
        return _dump_from_server(args, fmt)
    from goleash.probes.dump import build_dump, dump_samples, dump_to_dict, render_text
    from goleash.probes.target import GoProcess

    with GoProcess.attach(args.pid) as proc:
        dump = build_dump(proc, system=args.system)
    if fmt == "json":
        print_json(dump_to_dict(dump))
        return 0
    if fmt in ("pprof", "folded"):
        comment = f"goleash dump: PID {dump.pid} ({dump.exe}, {dump.go_version}), read from memory"
        _write_profile(args, fmt, dump_samples(dump), comments=[comment], mapping_file=dump.exe)
    else:
        sys.stdout.write(render_text(dump, system=args.system))
    hidden = f", {dump.hidden_system} runtime goroutines hidden" if dump.hidden_system else ""
    torn = f", {dump.torn} changed while read and skipped" if dump.torn else ""
    print(
        f"goleash dump: PID {dump.pid} ({dump.go_version}): {len(dump.entries)} goroutines"
        f"{hidden}{torn}, read in {dump.read_ms:.1f} ms without stopping it",
        file=sys.stderr,
    )
    return 0


def _dump_from_server(args: argparse.Namespace, fmt: str) -> int:
    """The goroutines the agents kept (orphans first, with stacks), as a dump."""
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    req = q.ListGoroutinesRequest(
        selector=q.ProcessSelector(service=args.service or "", pid=args.pid or 0),
        page_size=1000,
    )
    records = []
    with _client(args) as c:
        while True:
            resp = c.call("ListGoroutines", req)
            records.extend(resp.goroutines)
            if not resp.next_page_token or len(records) >= args.limit:
                break
            req.page_token = resp.next_page_token
    records = records[: args.limit]
    if fmt == "json":
        print_json(views.dump_json(records))
    elif fmt in ("pprof", "folded"):
        what = args.service or (f"PID {args.pid}" if args.pid else "all services")
        comment = f"goleash dump: goroutines the agents kept ({what})"
        _write_profile(args, fmt, views.record_samples(records), comments=[comment])
    else:
        sys.stdout.write(views.dump_text(records))
    return 0


def _latency_from_server(args: argparse.Namespace) -> int:
    """Quantiles of traced functions over a window, from what the agents sent."""
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    sel = q.ProcessSelector(service=args.service or "")
    with _client(args) as c:
        rows = [
            views.latency_dict(
                c.call(
                    "GetFunctionLatency",
                    q.GetFunctionLatencyRequest(
                        function=fn, selector=sel, window_seconds=args.window
                    ),
                )
            )
            for fn in args.func
        ]
    if args.json:
        print_json({"functions": rows})
    else:
        sys.stdout.write(views.latency_text(rows))
    return 0


def add_commands(sub: Any) -> None:
    _add_dump(sub)
    _add_trace(sub)
    _add_latency(sub)
    _add_panics(sub)


def _add_dump(sub: Any) -> None:
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
        epilog=(
            "examples:\n  goleash dump --pid 4242\n  goleash dump --pid 4242 --json | jq .\n"
            "  goleash dump --pid 4242 --format pprof -o goroutines.pb.gz && "
            "go tool pprof -top goroutines.pb.gz\n"
            "  goleash dump --pid 4242 --format folded | flamegraph.pl > goroutines.svg\n"
            "  goleash dump --server cp:7070 --service shop/frontend   "
            "(what the agents kept: orphans first)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pid", type=arg_pid, help="process to read (on this host, unless --server/--service)"
    )
    p.add_argument(
        "--format",
        choices=DUMP_FORMATS,
        help="text (runtime.Stack style, the default), json, pprof (gzipped protobuf "
        "goroutine profile for `go tool pprof`), folded (collapsed stacks for "
        "flamegraph.pl, inferno, speedscope)",
    )
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="write pprof/folded output to FILE (- is stdout)"
    )
    p.add_argument("--service", help="from the control plane: goroutines of this service")
    p.add_argument(
        "--limit", type=int, default=1000, help="from the control plane: at most N goroutines"
    )
    _server_args(p)
    p.add_argument(
        "--system",
        action="store_true",
        help="also the runtime's own goroutines and runtime frames (as GOTRACEBACK=system)",
    )
    p.set_defaults(handler=cmd_dump)


def _add_trace(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="live goroutine summary of one process, per creation site",
        description=(
            "Track every goroutine of a running Go process from birth to exit: a BPF uprobe "
            "counts each birth (one probe hit per goroutine, two with --lifetimes) and the "
            "live set is read from its memory. "
            "Prints, every interval, per creation site (started function + `go` statement): "
            "live, created, exited, ages and what they are blocked on. Needs root."
        ),
        epilog=(
            "examples:\n  goleash trace --pid 4242\n"
            "  goleash trace --pid 4242 --duration 30 --json > sites.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pid", type=arg_pid, required=True, help="process to trace")
    p.add_argument(
        "--duration", type=arg_seconds, help="stop after S seconds (default: until Ctrl-C)"
    )
    p.add_argument("--interval", type=arg_seconds, default=2.0, help="seconds between summaries")
    p.add_argument(
        "--stacks", action="store_true", help="also record each creator's stack (one more hit)"
    )
    p.add_argument(
        "--lifetimes",
        action="store_true",
        help="also trap every goroutine exit (one more hit per goroutine) for exact "
        "per-site lifetimes; without it exits are counted from memory and lifetimes are off",
    )
    p.add_argument(
        "--budget",
        type=budget_arg,
        default=0.01,
        help=BUDGET_HELP.format(who="the process"),
    )
    p.add_argument(
        "--max-live",
        type=int,
        help="size of the kernel's live-goroutine tables (default 131072: a goid-indexed "
        "array of that size rounded down to a power of two, plus a hash as large for "
        "collisions); births that fit in neither are counted as dropped",
    )
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(handler=cmd_trace)


def _add_latency(sub: Any) -> None:
    p = sub.add_parser(
        "latency",
        help="latency of chosen functions in a running process (calls, quantiles, histogram)",
        description=(
            "Time every call of the chosen functions in a running Go process with BPF uprobes"
            " at their entry (after the stack-growth check) and at every RET, paired per "
            "goroutine. Prints per function: calls (all of them), timed (the calls the "
            "quantiles come from), p50/p90/p99/p999, max and a log2 histogram (--json: the "
            "log-linear buckets). A pattern is an exact symbol, a glob (* and ?), or an alias"
            " such as http2.ReadFrame that finds the function in whichever package this Go "
            "release put it; goleash says what each pattern resolved to. Inlined functions "
            "have no code of their own and cannot be traced. A function whose calls would "
            "cost more than the --budget is sampled: its entry probe (cheap) still counts "
            "every call, its calls are timed for part of each interval, and the output says "
            "so (calls are estimated, with an error bound, only when even counting is over "
            "budget). Needs root."
        ),
        epilog=(
            "examples:\n  goleash latency --pid 4242 --func http2.ReadFrame --duration 10\n"
            "  goleash latency --pid 4242 --func 'net/http.(*conn).serve' 'main.*Handler' --json\n"
            "  goleash latency --func 'net/http.(*http2Framer).ReadFrame' --window 300"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pid", type=arg_pid, help="process to trace (without it: ask the control plane)"
    )
    p.add_argument(
        "--func",
        nargs="+",
        required=True,
        metavar="PATTERN",
        help="functions to time (with the control plane: symbols exactly as traced)",
    )
    p.add_argument("--service", help="from the control plane: this service only")
    p.add_argument(
        "--window",
        type=arg_seconds,
        default=60.0,
        help="from the control plane: seconds (default 60)",
    )
    _server_args(p)
    p.add_argument(
        "--duration", type=arg_seconds, help="stop after S seconds (default: until Ctrl-C)"
    )
    p.add_argument(
        "--interval", type=arg_seconds, default=1.0, help="seconds per sampling interval"
    )
    p.add_argument(
        "--budget",
        type=budget_arg,
        default=0.01,
        help=BUDGET_HELP.format(who="the process"),
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(handler=cmd_latency)


def _add_panics(sub: Any) -> None:
    p = sub.add_parser(
        "panics",
        help="count panics of a running process, per function that panicked",
        description=(
            "Count the panics of a running Go process, recovered or not, per function that "
            "panicked (the first caller of runtime.gopanic outside the runtime, with its "
            "file:line), with one BPF uprobe on runtime.gopanic. Needs root."
        ),
        epilog="examples:\n  goleash panics --pid 4242 --duration 60 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pid", type=arg_pid, required=True, help="process to watch")
    p.add_argument(
        "--duration", type=arg_seconds, help="stop after S seconds (default: until Ctrl-C)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(handler=cmd_panics)
