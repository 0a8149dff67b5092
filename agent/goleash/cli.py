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
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from goleash import __version__
from goleash.errors import GoleashError

Handler = Callable[[argparse.Namespace], int]


# --- argument types ------------------------------------------------------------
# Every subcommand shares these: nonsense is refused while the command line is parsed
# (one line, exit 2), before any work. float("nan"), float("inf") and "1e400" all
# parse as floats; a duration, interval or budget that is not a finite positive number
# would only fail later, and less clearly (a loop that never sleeps, a wait that never
# ends).

MAX_SECONDS = 366 * 24 * 3600.0  # a year: longer is a typo, and overflows some waits
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def arg_seconds(text: str) -> float:
    """A duration or interval: a finite number of seconds, more than zero."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: more than a year of seconds")
    return value


def arg_seconds_or_zero(text: str) -> float:
    """Seconds where 0 has a meaning of its own (e.g. "no minimum", "until cleared")."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: more than a year of seconds")
    return value


def arg_budget(text: str) -> float:
    """A share of one CPU core: more than 0, at most 1 (0.01 is 1%)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a share of one core, more than 0 and at most 1 (0.01 = 1%)"
        )
    return value


def arg_pid(text: str) -> int:
    """A process id: a positive integer within Linux's range."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if not 0 < value <= MAX_PID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return value


def arg_address(text: str) -> int:
    """A code address: hex with 0x, or decimal; 64 bits at most."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (e.g. 0x4a1b2c)") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-bit address")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Refuses a bad command line with one line on stderr (and exit 2), not the usage
    block: the line names the argument and why; --help shows the rest."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _target_args(p: argparse.ArgumentParser, *, path: bool) -> None:
    """PATH or --pid PID: the binary on disk, or the one a running process executes."""
    if path:
        p.add_argument("path", nargs="?", help="Go executable to read")
    p.add_argument("--pid", type=arg_pid, help="read the executable of this running process")


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
    from goleash.node.latency import run_panics

    return run_panics(args.pid, duration=args.duration, as_json=args.json, emit_json=print_json)


# --- dump --------------------------------------------------------------------------


def _remote(args: argparse.Namespace) -> bool:
    """Ask the control plane (not this host's process memory) when a control plane
    option was given, or nothing names a local process."""
    return bool(args.server or args.service) or args.pid is None


def cmd_dump(args: argparse.Namespace) -> int:
    if _remote(args):
        return _dump_from_server(args)
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


def _dump_from_server(args: argparse.Namespace) -> int:
    """The goroutines the agents kept (orphans first, with stacks), as a dump."""
    from google.protobuf.json_format import MessageToDict

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
    if args.json:
        print_json([MessageToDict(r, preserving_proto_field_name=True) for r in records])
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


# --- control plane and its clients ------------------------------------------------


def cmd_control_plane(args: argparse.Namespace) -> int:
    import os

    from goleash.control.server import ControlPlaneConfig, serve

    token = args.token or os.environ.get("GOLEASH_TOKEN") or None
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise GoleashError(
                f"cannot read --token-file {args.token_file}: {exc.strerror}"
            ) from exc
    return serve(
        ControlPlaneConfig(
            listen=args.listen,
            db=args.db,
            token=token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            max_message_bytes=args.max_message_bytes,
            policy_file=args.policy,
            health_listen=args.health_listen,
            metrics_listen=args.metrics_listen,
        )
    )


def _client(args: argparse.Namespace) -> Any:
    from goleash.control.client import ClientOptions, ControlClient

    return ControlClient(
        ClientOptions.from_env(
            server=args.server,
            token=args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            timeout=args.timeout,
        )
    )


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

        def frame(n: int) -> tuple[Any, Any, Any]:
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
        try:
            while True:
                rows = shutil.get_terminal_size((120, 40)).lines
                text = views.top_frame(c.opts.server, *frame(rows // 2), max_rows=rows - 1)
                sys.stdout.write("\x1b[H\x1b[2J" + text)  # home + clear, like top
                sys.stdout.flush()
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

    kinds = []
    for k in args.kind or ():
        name = "EVENT_KIND_" + k.upper().replace("-", "_")
        try:
            kinds.append(t.EventKind.Value(name))
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


def _server_args(p: argparse.ArgumentParser) -> None:
    from goleash.control import DEFAULT_SERVER

    g = p.add_argument_group("control plane connection")
    g.add_argument(
        "--server",
        help=f"control plane address (default $GOLEASH_SERVER or {DEFAULT_SERVER})",
    )
    g.add_argument("--token", help="bearer token for changes (default $GOLEASH_TOKEN)")
    g.add_argument("--tls-ca", help="CA bundle to verify the server with (turns TLS on)")
    g.add_argument("--tls-cert", help="client certificate for mTLS")
    g.add_argument("--tls-key", help="client key for mTLS")
    g.add_argument(
        "--timeout", type=arg_seconds, default=10.0, help="seconds per call (default 10)"
    )


def _add_control_commands(sub: Any) -> None:
    from goleash.control import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES

    p = sub.add_parser(
        "control-plane",
        help="run the control plane: ingest from agents, gRPC queries, event log",
        description=(
            "Serve the goleash gRPC API: agents stream their batches to it; `goleash ps`, "
            "`top`, `orphans`, `events` and tools query it. Keeps time windows per service "
            "and process and a durable event log in SQLite. Loopback only unless --listen "
            "says otherwise; configure TLS (mTLS with --tls-ca) before exposing it, and a "
            "token to protect policy changes and overrides."
        ),
        epilog=(
            "examples:\n  goleash control-plane\n"
            "  goleash control-plane --listen 0.0.0.0:7070 --db /data/goleash.db \\\n"
            "      --tls-cert tls.crt --tls-key tls.key --tls-ca ca.crt --token-file /run/token"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT (default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    p.add_argument("--db", help="event log file or directory (default /var/lib/goleash/goleash.db)")
    p.add_argument("--token", help="require this bearer token for changes (or $GOLEASH_TOKEN)")
    p.add_argument("--token-file", help="read the token from this file")
    p.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key turns TLS on")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-ca", help="CA bundle: clients must present a certificate it signed")
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"largest message accepted (default {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    p.add_argument("--policy", help="policy YAML file, reloaded when it changes (validated first)")
    p.add_argument(
        "--health-listen",
        help='also serve grpc.health.v1 in plaintext on HOST:PORT ("" live, goleash.ready '
        "ready), for probes that cannot speak TLS",
    )
    p.add_argument("--metrics-listen", help="serve Prometheus /metrics on HOST:PORT")
    p.set_defaults(handler=cmd_control_plane)

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

    p = sub.add_parser(
        "top",
        help="live table of processes and goroutine creation sites, like top",
        description=(
            "Refresh a table of the busiest processes and creation sites every interval "
            "(Ctrl-C quits). --once prints one frame; --json prints one snapshot."
        ),
        epilog="examples:\n  goleash top\n  goleash top --once --service shop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--interval", type=arg_seconds, default=2.0, help="seconds between frames")
    p.add_argument("--window", type=arg_seconds, default=60.0, help="seconds for rates and growth")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
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

    p = sub.add_parser(
        "agents",
        help="node agents connected to the control plane",
        description="List the agents that have sent batches, their state and counters.",
    )
    p.add_argument("--json", action="store_true", help="a JSON list on stdout")
    _server_args(p)
    p.set_defaults(handler=cmd_agents)


# --- node agent, embedded run ------------------------------------------------------


def _agent_config(args: argparse.Namespace) -> Any:
    import os

    from goleash.node.agent import AgentConfig
    from goleash.node.discovery import Selector

    def endpoint(value: str) -> str | None:
        return None if value in ("", "off") else value

    if args.interval <= 0:
        raise GoleashError("--interval must be positive")
    return AgentConfig(
        server=getattr(args, "server", None) or os.environ.get("GOLEASH_SERVER") or "",
        selector=Selector(
            pids=frozenset(args.pid or ()),
            exe_globs=tuple(args.exe or ()),
            cgroup_globs=tuple(args.cgroup or ()),
            pod_uids=frozenset(args.pod_uid or ()),
        ),
        interval=args.interval,
        node_name=args.node_name,
        agent_id=args.agent_id,
        funcs=tuple(args.func or ()),
        panics=args.panics,
        health_listen=endpoint(args.health_listen),
        metrics_listen=endpoint(args.metrics_listen),
        host_root=args.host_root,
        token=getattr(args, "token", None) or os.environ.get("GOLEASH_TOKEN") or None,
        tls_ca=getattr(args, "tls_ca", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        orphan_min_age_s=args.orphan_min_age,
        budget_fraction=args.budget,
        stacks=args.stacks,
        buffer_batches=args.buffer_batches,
    )


def cmd_agent(args: argparse.Namespace) -> int:
    from goleash.node.agent import DEFAULT_SERVER, serve

    cfg = _agent_config(args)
    cfg.server = cfg.server or DEFAULT_SERVER
    return serve(cfg)


def cmd_run(args: argparse.Namespace) -> int:
    from goleash.control.server import ControlPlaneConfig
    from goleash.embedded import serve

    return serve(
        ControlPlaneConfig(listen=args.listen, db=args.db, token=args.token), _agent_config(args)
    )


def _agent_args(p: argparse.ArgumentParser, *, metrics_default: str, health_default: str) -> None:
    from goleash.node.sender import DEFAULT_MAX_BATCHES
    from goleash.node.tracker import DEFAULT_ORPHAN_MIN_AGE_S

    g = p.add_argument_group(
        "which processes (every criterion given must hold; default: every Go process)"
    )
    g.add_argument(
        "--pid", type=arg_pid, nargs="+", action="extend", metavar="PID", help="these PIDs"
    )
    g.add_argument(
        "--exe",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="executables matching a glob (full path or base name), e.g. '*/shop-*'",
    )
    g.add_argument(
        "--cgroup",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="processes whose cgroup path matches (containers), e.g. '*docker-*'",
    )
    g.add_argument(
        "--pod-uid",
        nargs="+",
        action="extend",
        metavar="UID",
        help="processes of these Kubernetes pods (UID from the kubepods cgroup path)",
    )
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--interval", type=arg_seconds, default=5.0, help="seconds between snapshots (5)"
    )
    g.add_argument(
        "--func",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="time these functions in every followed process where they exist "
        "(exact symbol, glob, or alias like http2.ReadFrame; see `goleash latency`)",
    )
    g.add_argument(
        "--panics", action="store_true", help="count panics (one uprobe on runtime.gopanic)"
    )
    g.add_argument(
        "--orphan-min-age",
        type=arg_seconds_or_zero,
        default=DEFAULT_ORPHAN_MIN_AGE_S,
        metavar="S",
        help=f"an orphan is at least S seconds old (default {DEFAULT_ORPHAN_MIN_AGE_S:g})",
    )
    g.add_argument(
        "--budget",
        type=arg_budget,
        default=0.01,
        help="max share of one core the probes may cost each process (default 0.01 = 1%%)",
    )
    g.add_argument(
        "--stacks", action="store_true", help="record each creation site's creator stack"
    )
    g = p.add_argument_group("agent")
    g.add_argument("--node-name", help="node name (default $NODE_NAME, else the host name)")
    g.add_argument("--agent-id", help="stable agent id (default: node name + boot id)")
    g.add_argument(
        "--host-root",
        default="/",
        help="where the host's filesystem is mounted (in a container: /host)",
    )
    g.add_argument(
        "--health-listen",
        default=health_default,
        metavar="HOST:PORT",
        help=f"gRPC health (\"\" live, goleash.ready ready); 'off' for none "
        f"(default {health_default})",
    )
    g.add_argument(
        "--metrics-listen",
        default=metrics_default,
        metavar="HOST:PORT",
        help=f"Prometheus /metrics; 'off' for none (default {metrics_default})",
    )
    g.add_argument(
        "--buffer-batches",
        type=int,
        default=DEFAULT_MAX_BATCHES,
        metavar="N",
        help=f"batches kept while the control plane is away (default {DEFAULT_MAX_BATCHES}; "
        "the oldest are dropped and counted beyond)",
    )


def _add_agent_commands(sub: Any) -> None:
    from goleash.control import DEFAULT_LISTEN, DEFAULT_SERVER
    from goleash.node.agent import DEFAULT_HEALTH_LISTEN, DEFAULT_METRICS_LISTEN

    p = sub.add_parser(
        "agent",
        help="the node agent: follow the host's Go processes, stream to a control plane",
        description=(
            "Find the Go processes of this host (and new ones as they start), trace their "
            "goroutines with BPF uprobes and their memory, and stream a summary every "
            "interval to the control plane. Keeps a bounded buffer while the control plane "
            "is away and reconnects with backoff. Serves Prometheus /metrics and gRPC "
            "health. Never traces itself; a process it cannot trace is reported, not fatal. "
            "Needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE)."
        ),
        epilog=(
            "examples:\n  goleash agent --server cp.example:7070 --tls-ca ca.crt\n"
            "  goleash agent --exe '*/shop-*' --interval 2 --func http2.ReadFrame"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _agent_args(p, metrics_default=DEFAULT_METRICS_LISTEN, health_default=DEFAULT_HEALTH_LISTEN)
    g = p.add_argument_group("control plane connection")
    g.add_argument(
        "--server", help=f"control plane address (default $GOLEASH_SERVER or {DEFAULT_SERVER})"
    )
    g.add_argument("--token", help="bearer token sent with the stream (default $GOLEASH_TOKEN)")
    g.add_argument("--tls-ca", help="CA bundle to verify the control plane (turns TLS on)")
    g.add_argument("--tls-cert", help="client certificate for mTLS")
    g.add_argument("--tls-key", help="client key for mTLS")
    p.set_defaults(handler=cmd_agent)

    p = sub.add_parser(
        "run",
        help="agent + control plane in one process: goleash on one machine, no set-up",
        description=(
            "Run the control plane (on loopback) and the node agent in one process; the agent "
            "streams to the control plane over gRPC as a remote one would. With no selection "
            "flags every Go process on the host is followed, except goleash itself. Then use "
            "`goleash ps`, `top`, `orphans`, `events` against it (their default --server)."
        ),
        epilog=(
            "examples:\n  goleash run\n  goleash run --exe '*/shop-*' --interval 2 "
            "--db /tmp/goleash.db"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"control plane HOST:PORT (default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    p.add_argument("--db", help="event log file or directory (default /var/lib/goleash/goleash.db)")
    p.add_argument("--token", help="require this bearer token for changes (or $GOLEASH_TOKEN)")
    _agent_args(p, metrics_default=DEFAULT_METRICS_LISTEN, health_default=DEFAULT_HEALTH_LISTEN)
    p.set_defaults(handler=cmd_run)


# --- policy engine: policy, overrides, decisions ---------------------------------------


def cmd_policy(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q

    if args.action == "check":
        from goleash.control.engine import check_policy_text

        pol = check_policy_text(_read_policy(args.file))
        print(f"{args.file}: ok ({pol.mode}, {len(pol.rules)} rule(s))")
        return 0
    with _client(args) as c:
        if args.action == "get":
            resp = c.call("GetPolicy", q.GetPolicyRequest())
            if args.json:
                from google.protobuf import json_format

                print_json(json_format.MessageToDict(resp))
            elif not resp.version:
                print("no policy set", file=sys.stderr)
            else:
                mode = q.PolicyMode.Name(resp.mode).removeprefix("POLICY_MODE_").lower()
                print(f"# version {resp.version} from {resp.source} ({mode})")
                sys.stdout.write(resp.policy_yaml)
                for o in resp.overrides:
                    what = q.OverrideAction.Name(o.action).removeprefix("OVERRIDE_ACTION_")
                    print(f"# override {o.id}: {o.service} {what.lower()} {o.rule or o.level}")
            return 0
        resp = c.call(
            "SetPolicy",
            q.SetPolicyRequest(policy_yaml=_read_policy(args.file), validate_only=args.dry_run),
        )
    mode = q.PolicyMode.Name(resp.mode).removeprefix("POLICY_MODE_").lower()
    verb = "valid; version" if args.dry_run else "running: version"
    print(f"{args.file}: {verb} {resp.version} ({mode}, {resp.rules} rule(s))")
    return 0


def _read_policy(path: str) -> str:
    if path == "-" and sys.stdin.isatty():
        # Reading a terminal would wait for a policy typed by hand: say what is missing.
        raise GoleashError("give a policy YAML file (or - with the policy piped on stdin)")
    try:
        return sys.stdin.read() if path == "-" else open(path).read()
    except OSError as exc:
        raise GoleashError(f"cannot read {path}: {exc.strerror}") from exc


def cmd_override(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q

    actions = {
        "pause": q.OVERRIDE_ACTION_PAUSE_RULE,
        "degrade": q.OVERRIDE_ACTION_FORCE_DEGRADE,
        "recover": q.OVERRIDE_ACTION_FORCE_RECOVER,
        "clear": q.OVERRIDE_ACTION_CLEAR,
    }
    if args.action == "pause" and not args.rule:
        raise GoleashError("pause needs --rule NAME (the rule to stop evaluating)")
    req = q.OverrideServiceRequest(
        service=args.service,
        action=actions[args.action],
        rule=args.rule or "",
        level=args.level or "",
        duration_seconds=args.duration,
        reason=args.reason or "",
    )
    with _client(args) as c:
        resp = c.call("OverrideService", req)
    if args.action == "clear":
        print(f"{args.service}: {resp.cleared} override(s) cleared")
    else:
        until = f" for {args.duration:g}s" if args.duration else " until cleared"
        print(f"{args.service}: override {resp.override.id} ({args.action}){until}")
    return 0


def cmd_decisions(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    with _client(args) as c:
        resp = c.call(
            "ListDecisions",
            q.ListDecisionsRequest(service=args.service or "", page_size=args.limit),
        )
    found = sorted(resp.decisions, key=lambda e: e.id)
    if args.json:
        print_json([views.event_dict(e) for e in found])
    else:
        for e in found:
            print(views.event_line(e))
    return 0


def _add_policy_commands(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="the policy engine's policy: check a file, set it, show the running one",
        description=(
            "check: validate a policy file the way the control plane will (line and reason "
            "on error), offline. set: make it the running policy (validated first; a bad one "
            "is rejected and the old one keeps running). get: the running policy, its "
            "version and the active overrides."
        ),
        epilog=(
            "examples:\n  goleash policy check policy.yaml\n  goleash policy set policy.yaml\n"
            "  goleash policy set --dry-run policy.yaml\n  goleash policy get"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("check", "set", "get"))
    p.add_argument("file", nargs="?", default="-", help="policy YAML (check, set; - is stdin)")
    p.add_argument("--dry-run", action="store_true", help="set: only validate on the server")
    p.add_argument("--json", action="store_true", help="get: JSON on stdout")
    _server_args(p)
    p.set_defaults(handler=cmd_policy)

    p = sub.add_parser(
        "override",
        help="pause a rule for a service, force it degraded or recovered, or clear that",
        description=(
            "Manual overrides of the policy engine for one service: `pause` stops one rule "
            "(--rule), `degrade` forces it to a level (--level, default the highest) now, "
            "`recover` forces it back and holds it there, `clear` removes its overrides. The "
            "policy's mode still applies (monitor only records). Needs the token if one is set."
        ),
        epilog=(
            "examples:\n  goleash override shop/checkout degrade --level L3 --reason drill\n"
            "  goleash override shop/checkout pause --rule goroutine-levels --duration 3600\n"
            "  goleash override shop/checkout clear"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("service", help="service name, as `goleash ps` shows it")
    p.add_argument("action", choices=("pause", "degrade", "recover", "clear"))
    p.add_argument("--rule", help="the rule (pause; degrade/recover: only this rule)")
    p.add_argument("--level", help="degrade: the level, e.g. L2 (default the highest)")
    p.add_argument(
        "--duration",
        type=arg_seconds_or_zero,
        default=0.0,
        help="seconds (default: until cleared)",
    )
    p.add_argument("--reason", help="why, for the event log")
    _server_args(p)
    p.set_defaults(handler=cmd_override)

    p = sub.add_parser(
        "decisions",
        help="what the policy engine decided and every action attempt, with evidence",
        description="Decisions (degrade, recover, hold) and action attempts, oldest first.",
        epilog="examples:\n  goleash decisions --service shop/checkout --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--limit", type=int, default=50, help="how many of the latest (default 50)")
    p.add_argument("--json", action="store_true", help="a JSON list with the evidence")
    _server_args(p)
    p.set_defaults(handler=cmd_decisions)


# --- the parser ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    p.add_argument(
        "pcs", nargs="+", type=arg_address, metavar="PC", help="addresses, e.g. 0x4a1b2c"
    )
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
        epilog=(
            "examples:\n  goleash dump --pid 4242\n  goleash dump --pid 4242 --json | jq .\n"
            "  goleash dump --server cp:7070 --service shop/frontend   "
            "(what the agents kept: orphans first)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pid", type=arg_pid, help="process to read (on this host, unless --server/--service)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
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
    p.add_argument("--pid", type=arg_pid, required=True, help="process to trace")
    p.add_argument(
        "--duration", type=arg_seconds, help="stop after S seconds (default: until Ctrl-C)"
    )
    p.add_argument("--interval", type=arg_seconds, default=2.0, help="seconds between summaries")
    p.add_argument(
        "--stacks", action="store_true", help="also record each creator's stack (one more hit)"
    )
    p.add_argument(
        "--budget",
        type=arg_budget,
        default=0.01,
        help="max share of one core the probes may cost the process (default 0.01 = 1%%)",
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

    p = sub.add_parser(
        "latency",
        help="latency of chosen functions in a running process (count, quantiles, histogram)",
        description=(
            "Time every call of the chosen functions in a running Go process with BPF "
            "uprobes at their entry (after the stack-growth check) and at every RET, paired "
            "per goroutine. Prints per function: count, p50/p90/p99/p999, max and a log2 "
            "histogram. A pattern is an exact symbol, a glob (* and ?), or an alias such as "
            "http2.ReadFrame that finds the function in whichever package this Go release "
            "put it; goleash says what each pattern resolved to. Inlined functions have no "
            "code of their own and cannot be traced. A function whose calls would cost more "
            "than the --budget is sampled (probes attached for part of each interval), and "
            "the output says so. Needs root."
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
        type=arg_budget,
        default=0.01,
        help="max share of one core the probes may cost the process (default 0.01 = 1%%)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(handler=cmd_latency)

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

    _add_control_commands(sub)
    _add_agent_commands(sub)
    _add_policy_commands(sub)

    return parser


_ONE_TARGET_COMMANDS = frozenset({"inspect", "symbolize", "trace", "latency", "panics", "dump"})


def _printable(text: str) -> str:
    """A message for a terminal: control characters that can come from a binary's or
    a process's strings (escape sequences, carriage returns) shown escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except GoleashError as exc:
        print(f"goleash {args.command}: {_printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        # Commands that read one process or one file meet whatever it holds: a failure
        # there is a message and exit 2, not a traceback (GOLEASH_DEBUG=1 shows it).
        if args.command not in _ONE_TARGET_COMMANDS or os.environ.get("GOLEASH_DEBUG"):
            raise
        print(
            f"goleash {args.command}: failed: {type(exc).__name__}: {_printable(str(exc))} "
            "(set GOLEASH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
