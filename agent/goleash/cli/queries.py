"""Commands that query the control plane: ps, top, orphans, events, agents."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

from goleash.cli.options import (
    _client,
    _server_args,
    arg_pid,
    arg_seconds,
    arg_seconds_or_zero,
    print_json,
)
from goleash.errors import GoleashError


def cmd_ps(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    req = q.ListProcessesRequest(
        selector=q.ProcessSelector(service=args.service or ""),
        window_seconds=args.window,
        include_gone=args.all,
    )
    with _client(args) as c:
        resp = c.call("ListProcesses", req)
    if args.json:
        print_json([views.process_dict(p, resp.window_seconds) for p in resp.processes])
    else:
        sys.stdout.write(views.processes_text(resp))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    import shutil
    import time

    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    sel = q.ProcessSelector(service=args.service or "")
    with _client(args) as c:

        def frame(
            n: int,
        ) -> tuple[q.ListProcessesResponse, q.GetGoroutineSummaryResponse, q.ListAgentsResponse]:
            # the busiest n processes and sites: the server does the ranking, so a
            # frame costs the same with 20 processes or 20,000
            return (
                c.call(
                    "ListProcesses",
                    q.ListProcessesRequest(
                        selector=sel,
                        window_seconds=args.window,
                        order_by=q.PROCESS_ORDER_GOROUTINES,
                        limit=n,
                    ),
                ),
                c.call(
                    "GetGoroutineSummary",
                    q.GetGoroutineSummaryRequest(selector=sel, window_seconds=args.window, limit=n),
                ),
                c.call("ListAgents", q.ListAgentsRequest()),
            )

        if args.json:
            print_json(views.top_json(*frame(args.limit)))
            return 0
        if args.once:
            text = views.top_frame(c.opts.server, *frame(args.limit), max_rows=2 * args.limit + 8)
            sys.stdout.write(text)
            return 0
        # Into a pipe or file: plain snapshots one after another, as `top -b` writes
        # them; screen-clearing escapes only for a terminal.
        terminal = sys.stdout.isatty()
        shown = 0
        try:
            while True:
                if terminal:
                    rows = shutil.get_terminal_size((120, 40)).lines
                    text = views.top_frame(c.opts.server, *frame(rows // 2), max_rows=rows - 1)
                    sys.stdout.write("\x1b[H\x1b[2J" + text)  # home + clear, like top
                else:
                    text = views.top_frame(
                        c.opts.server, *frame(args.limit), max_rows=2 * args.limit + 8
                    )
                    sys.stdout.write(("\n" if shown else "") + text)
                sys.stdout.flush()
                shown += 1
                if args.iterations and shown >= args.iterations:
                    return 0
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def cmd_orphans(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    req = q.ListOrphansRequest(
        selector=q.ProcessSelector(service=args.service or "", pid=args.pid or 0),
        min_age_seconds=args.min_age,
    )
    with _client(args) as c:
        resp = c.call("ListOrphans", req)
    if args.json:
        print_json([views.orphan_dict(g) for g in resp.groups])
    else:
        sys.stdout.write(views.orphans_text(resp))
    return 1 if args.fail_if_any and resp.groups else 0


def cmd_agents(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    with _client(args) as c:
        resp = c.call("ListAgents", q.ListAgentsRequest())
    if args.json:
        print_json([views.agent_dict(a) for a in resp.agents])
    else:
        sys.stdout.write(views.agents_text(resp))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.api.goleash.v1 import types_pb2 as t
    from goleash.control import views

    kinds: list[t.EventKind] = []
    for k in args.kind or ():
        name = "EVENT_KIND_" + k.upper().replace("-", "_")
        try:
            kinds.append(cast(t.EventKind, t.EventKind.Value(name)))
        except ValueError:
            names = t.EventKind.keys()[1:]
            known = ", ".join(n.removeprefix("EVENT_KIND_").lower() for n in names)
            raise GoleashError(f"unknown event kind {k!r} (known: {known})") from None
    flt = q.EventFilter(kinds=kinds, service=args.service or "", pid=args.pid or 0)
    with _client(args) as c:
        if not args.follow:
            resp = c.call(
                "ListEvents",
                q.ListEventsRequest(
                    filter=flt,
                    after_id=args.after_id,
                    newest_first=not args.after_id,
                    page_size=args.limit,
                ),
            )
            found = sorted(resp.events, key=lambda e: e.id)
            if args.json:
                print_json([views.event_dict(e) for e in found])
            else:
                for e in found:
                    print(views.event_line(e))
            return 0
        req = q.WatchEventsRequest(filter=flt, after_id=args.after_id)
        try:
            for e in c.watch_events(req):
                if args.json:
                    print(json.dumps(views.event_dict(e)), flush=True)
                else:
                    print(views.event_line(e), flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


def add_commands(sub: Any) -> None:
    _add_ps(sub)
    _add_top(sub)
    _add_orphans(sub)
    _add_events(sub)
    _add_agents(sub)


def _add_ps(sub: Any) -> None:
    p = sub.add_parser(
        "ps",
        help="processes the agents follow, with goroutine counts",
        description="List the Go processes the agents follow, from the control plane.",
        epilog="examples:\n  goleash ps\n  goleash ps --service shop --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--all", action="store_true", help="also processes that exited recently")
    p.add_argument("--window", type=arg_seconds, default=60.0, help="seconds for created/exited")
    p.add_argument("--json", action="store_true", help="a JSON list on stdout")
    _server_args(p)
    p.set_defaults(handler=cmd_ps)


def _add_top(sub: Any) -> None:
    p = sub.add_parser(
        "top",
        help="live table of processes and goroutine creation sites, like top",
        description=(
            "Refresh a table of the busiest processes and creation sites every interval "
            "(Ctrl-C quits). --once prints one frame; --json prints one snapshot. Into a "
            "pipe or file it writes plain snapshots, no screen control."
        ),
        epilog="examples:\n  goleash top\n  goleash top --once --service shop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--interval", type=arg_seconds, default=2.0, help="seconds between frames")
    p.add_argument("--window", type=arg_seconds, default=60.0, help="seconds for rates and growth")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument(
        "-n",
        "--iterations",
        type=int,
        default=0,
        metavar="N",
        help="stop after N frames (default: until Ctrl-C); not on a terminal, frames are "
        "plain snapshots one after another, as `top -b` writes them",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=20,
        help="processes and sites shown by --once and --json (default 20; the live view "
        "fits the terminal)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    _server_args(p)
    p.set_defaults(handler=cmd_top)


def _add_orphans(sub: Any) -> None:
    p = sub.add_parser(
        "orphans",
        help="goroutines whose creator exited and that wait on something that will not come",
        description=(
            "Orphaned goroutines grouped by service and creation site: the function, the "
            "`go` statement, how many, the oldest's age and what they wait on."
        ),
        epilog="examples:\n  goleash orphans\n  goleash orphans --json --min-age 60",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--pid", type=arg_pid, help="only this process")
    p.add_argument(
        "--min-age", type=arg_seconds_or_zero, default=0.0, help="only groups at least S old"
    )
    p.add_argument("--fail-if-any", action="store_true", help="exit 1 when there are orphans")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON list of groups (function, go_statement, count, oldest_age_s, reason, ...)",
    )
    _server_args(p)
    p.set_defaults(handler=cmd_orphans)


def _add_events(sub: Any) -> None:
    p = sub.add_parser(
        "events",
        help="the control plane's event log (--follow to stream new events)",
        description=(
            "Print the latest events (processes appearing and going, orphans, leak "
            "suspects, policy decisions and actions), or follow them as they happen."
        ),
        epilog=(
            "examples:\n  goleash events --limit 20\n"
            "  goleash events --follow --kind decision --kind action"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--follow", "-f", action="store_true", help="stream new events until Ctrl-C")
    p.add_argument("--kind", action="append", help="only this kind, e.g. process_appeared")
    p.add_argument("--service", help="only this service")
    p.add_argument("--pid", type=arg_pid, help="only this process")
    p.add_argument("--limit", type=int, default=50, help="how many of the latest (default 50)")
    p.add_argument("--after-id", type=int, default=0, help="events after this id (resume)")
    p.add_argument("--json", action="store_true", help="JSON (a list; one object a line with -f)")
    _server_args(p)
    p.set_defaults(handler=cmd_events)


def _add_agents(sub: Any) -> None:
    p = sub.add_parser(
        "agents",
        help="node agents connected to the control plane",
        description="List the agents that have sent batches, their state and counters.",
    )
    p.add_argument("--json", action="store_true", help="a JSON list on stdout")
    _server_args(p)
    p.set_defaults(handler=cmd_agents)
