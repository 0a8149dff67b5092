"""What an upgrade changed: record and diff."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from goleash.cli.options import (
    _client,
    _server_args,
    print_json,
)
from goleash.errors import GoleashError

# --- record and diff: what an upgrade changed ------------------------------------------


def _service_record(args: argparse.Namespace, service: str) -> Any:
    from goleash.control.servicerecord import record_service

    with _client(args) as c:
        return record_service(c, service, window_s=args.window, funcs=args.func)


def cmd_record(args: argparse.Namespace) -> int:
    from goleash.node.record import RecordError, record, write_record

    if (args.pid is None) == (args.service is None):
        raise RecordError("give either --pid PID or --service NS/NAME")
    if args.service is not None:
        rec = _service_record(args, args.service)
        who = f"service {args.service}"
    else:
        rec = record(
            args.pid,
            duration=args.duration,
            interval=args.interval,
            funcs=args.func,
            budget_fraction=args.budget,
        )
        who = f"PID {args.pid}"
    write_record(rec, args.output)
    print(
        f"goleash record: {who} ({rec['build']['go_version']}) over "
        f"{rec['duration_s']:.0f}s: {len(rec['sites'])} creation sites, "
        f"{len(rec['functions'])} functions -> {args.output}",
        file=sys.stderr,
    )
    return 0


def _load_record(path: str) -> Any:
    from goleash.recdiff import DiffError

    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise DiffError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise DiffError(f"{path}: not JSON (expected a `goleash record` report)") from None


def cmd_diff(args: argparse.Namespace) -> int:
    from goleash.control.flamegraph import render_svg
    from goleash.recdiff import DiffError, diff, render_html, render_text

    if args.service or args.against:
        if not (args.service and args.against) or args.before or args.after:
            raise DiffError("give BEFORE.json AFTER.json, or --service A --against B")
        before = _service_record(args, args.against)
        after = _service_record(args, args.service)
        names = (args.against, args.service)
    else:
        if not (args.before and args.after):
            raise DiffError("give BEFORE.json AFTER.json, or --service A --against B")
        before, after = _load_record(args.before), _load_record(args.after)
        names = (args.before, args.after)
    d = diff(before, after, fail_on=args.fail_on, names=names)
    if args.html:
        try:
            with open(args.html, "w") as f:
                f.write(render_html(d, render_svg))
        except OSError as exc:
            raise GoleashError(f"cannot write {args.html}: {exc.strerror}") from None
    if args.json:
        print_json(d.to_dict())
    else:
        sys.stdout.write(render_text(d, all_rows=args.all))
    return 1 if d.failed else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "record",
        help="record a process's goroutine sites and function latency to a file",
        description=(
            "Record build info, per creation site the goroutines created, live count over "
            "time, growth per minute, ages and wait reasons, and the latency of --func "
            "functions, for `goleash diff`. Needs root."
        ),
    )
    p.add_argument("--pid", type=int, help="record this process (probes, needs root)")
    p.add_argument("--service", metavar="NS/NAME", help="record a service from the control plane")
    p.add_argument(
        "--window", type=float, default=300.0, help="with --service: seconds back (default 300)"
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument(
        "--func", action="append", default=[], metavar="PATTERN", help="time this function"
    )
    p.add_argument("--budget", type=float, default=0.05, help="max fraction of a core for probes")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    _server_args(p)
    p.set_defaults(handler=cmd_record)

    p = sub.add_parser(
        "diff",
        help="compare two recordings: build, goroutine sites, latency (exit 1 on --fail-on)",
        description=(
            "Compare two `goleash record` reports: build changes, creation sites new, gone "
            "or growing (matched by function and creator, tolerant to line shifts), "
            "functions whose p50/p99 moved beyond noise."
        ),
    )
    p.add_argument("before", nargs="?", help="a `goleash record` report")
    p.add_argument("after", nargs="?", help="the report to compare with it")
    p.add_argument("--service", metavar="NS/NAME", help="the new service (control plane)")
    p.add_argument("--against", metavar="NS/NAME", help="the service it is compared with")
    p.add_argument("--window", type=float, default=300.0, help="seconds back (default 300)")
    p.add_argument(
        "--func", action="append", default=[], metavar="SYMBOL", help="compare its latency"
    )
    p.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="RULE",
        help="exit 1 when a rule matches: growth, new-site, live, module, go-version, "
        "build, p50:+N%%, p99:+N%% (repeatable or comma-separated)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument("--all", action="store_true", help="show unchanged rows too")
    _server_args(p)
    p.set_defaults(handler=cmd_diff)
