# PYTHON_ARGCOMPLETE_OK
"""The one `goleash` command.

Each subcommand is a small function taking parsed args and returning an exit code;
the work itself lives in the packages (gobin, probes, node, control). Exit codes:
0 success, 1 the check a command makes failed (e.g. leaks found where asked to
fail on them), 2 bad input or an environment goleash cannot work in (message on
stderr, never a traceback), 130 interrupted.

Options go anywhere in the line, as in kubectl: the global ones (logging, the
control plane connection) before or after the subcommand, a subcommand's options
before or after its positional arguments (`policy set --dry-run pol.yaml`). A bad
option prints that subcommand's usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
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


BUDGET_HELP = (
    "max share of one core the probes may cost {who} (default 0.01 = 1%%; 'none' for no "
    "limit; 0 allows no probe at all)"
)


def budget_arg(text: str) -> float:
    """--budget: a share of one core >= 0, or 'none' (no limit)."""
    if text.strip().lower() == "none":
        return float("inf")
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: give a share of one core such as 0.01, or 'none'"
        )
    return v


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


# --- control plane and its clients ------------------------------------------------


def _auth_config(args: argparse.Namespace) -> Any:
    from goleash.control.auth import AuthConfig, Role

    return AuthConfig(
        token_files={
            Role.ADMIN: args.admin_token_file or (),
            Role.VIEWER: args.viewer_token_file or (),
            Role.AGENT: getattr(args, "agent_token_file", None) or (),
        },
        client_roles=getattr(args, "client_role", None) or (),
        insecure=args.insecure,
    )


def cmd_control_plane(args: argparse.Namespace) -> int:
    from goleash.control.server import ControlPlaneConfig, serve

    return serve(
        ControlPlaneConfig(
            listen=args.listen,
            db=args.db,
            credentials=_auth_config(args),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            max_message_bytes=args.max_message_bytes,
            policy_file=args.policy,
            health_listen=args.health_listen,
            metrics_listen=args.metrics_listen,
            evidence_listen=args.evidence_listen,
            external_url=args.external_url or "",
            otlp_endpoint=args.otlp_endpoint or _otlp_env(),
            otlp_interval=args.otlp_interval,
            events_max_age_seconds=args.events_max_age,
            events_max_bytes=args.events_max_bytes,
        )
    )


def _otlp_env() -> str | None:
    """The OpenTelemetry SDK's standard variables for the OTLP endpoint."""
    import os

    env = os.environ
    return env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def _client(args: argparse.Namespace) -> Any:
    from goleash.control.auth import client_token
    from goleash.control.client import ClientOptions, ControlClient

    return ControlClient(
        ClientOptions.from_env(
            server=args.server,
            token=client_token(args.token, args.token_file),
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


def _token_args(g: Any, what: str) -> None:
    g.add_argument(
        "--token-file",
        help=f"file holding the bearer token of {what}; preferred over --token, "
        "whose value other users can see in the process list",
    )
    g.add_argument("--token", help="bearer token (default $GOLEASH_TOKEN; empty is an error)")


def _access_args(p: argparse.ArgumentParser, *, agent_tokens: bool) -> None:
    g = p.add_argument_group(
        "authentication",
        "Every RPC needs a role: agent (ingest), viewer (queries, events), admin (policy, "
        "overrides; includes viewer). Token files hold one token per line (`TOKEN` or "
        "`NAME TOKEN`; several lines rotate), also $GOLEASH_{ADMIN,VIEWER,AGENT}_TOKEN. "
        "With none configured only a loopback address is served.",
    )
    g.add_argument("--admin-token-file", action="append", help="tokens of the admin role")
    g.add_argument("--viewer-token-file", action="append", help="tokens of the viewer role")
    if agent_tokens:
        g.add_argument("--agent-token-file", action="append", help="tokens of the agent role")
        g.add_argument(
            "--client-role",
            action="append",
            metavar="IDENTITY=ROLE",
            help="give client certificates with this identity (SAN URI, SAN DNS or CN; a "
            "trailing * matches a prefix) a role; needs --tls-ca",
        )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback address without authentication (anyone reaching it may "
        "change the policy and trigger actions); logged loudly",
    )


def _server_args(p: argparse.ArgumentParser) -> None:
    from goleash.control import DEFAULT_SERVER

    g = p.add_argument_group("control plane connection")
    g.add_argument(
        "--server",
        help=f"control plane address (default $GOLEASH_SERVER or {DEFAULT_SERVER})",
    )
    _token_args(g, "this client's role (viewer to read, admin to change)")
    g.add_argument("--tls-ca", help="CA bundle to verify the server with (turns TLS on)")
    g.add_argument("--tls-cert", help="client certificate for mTLS")
    g.add_argument("--tls-key", help="client key for mTLS")
    g.add_argument(
        "--timeout", type=arg_seconds, default=10.0, help="seconds per call (default 10)"
    )


def _global_args(p: argparse.ArgumentParser) -> dict[str, Any]:
    """The options that may also come before the subcommand: logging and the control
    plane connection. Added with no default (a value given before the subcommand must
    survive the subcommand's defaults); returns the defaults they would have had."""
    first = len(p._actions)
    _log_args(p)
    _server_args(p)
    defaults = {}
    for action in p._actions[first:]:
        if action.default is not argparse.SUPPRESS:
            defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    return defaults


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_args(p: argparse.ArgumentParser) -> None:
    """--log-level/--log-format, on the top-level parser and every subcommand (never a
    default here: main() picks one per command)."""
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="least severe message logged (default: info for agent, control-plane and "
        "run; warning for the rest)",
    )
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="text (timestamped lines) or json (one object a line: time, level, logger, "
        "message), on stderr",
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
            "says otherwise; elsewhere it refuses to start without authentication (tokens "
            "per role, or client certificates mapped to roles) unless --insecure is given."
        ),
        epilog=(
            "examples:\n  goleash control-plane\n"
            "  goleash control-plane --listen 0.0.0.0:7070 --db /data/goleash.db \\\n"
            "      --tls-cert tls.crt --tls-key tls.key --tls-ca ca.crt \\\n"
            "      --agent-token-file /run/tokens/agent --admin-token-file /run/tokens/admin"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT (default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    p.add_argument("--db", help="event log file or directory (default /var/lib/goleash/goleash.db)")
    _access_args(p, agent_tokens=True)
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
    p.add_argument(
        "--evidence-listen",
        metavar="HOST:PORT",
        help="serve the policy engine's evidence (flame graph SVG, folded stacks, pprof) "
        "over HTTP at /evidence/NAME, for alerts to link to",
    )
    p.add_argument(
        "--external-url",
        metavar="URL",
        help="the URL users reach the evidence server at, for alerts' links and "
        "Alertmanager's generatorURL (default http://EVIDENCE-LISTEN)",
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="also push the same metrics over OTLP/gRPC to this collector (needs "
        "pip install 'goleash[otlp]'; default $OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    p.add_argument(
        "--otlp-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between OTLP exports (default 30)",
    )
    p.add_argument(
        "--events-max-age",
        type=float,
        default=30 * 86400.0,
        metavar="SECONDS",
        help="event log retention: forget events older than this (default 30 days)",
    )
    p.add_argument(
        "--events-max-bytes",
        type=int,
        default=256 * 1024 * 1024,
        metavar="BYTES",
        help="event log ceiling: drop the oldest events beyond this size (default 256 MiB)",
    )
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

    from goleash.control.auth import client_token
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
        metrics_top_sites=args.metrics_top_sites,
        metrics_pid_label=args.metrics_pid_label,
        otlp_endpoint=args.otlp_endpoint or _otlp_env(),
        otlp_interval=args.otlp_interval,
        host_root=args.host_root,
        token=client_token(getattr(args, "token", None), getattr(args, "token_file", None))
        if hasattr(args, "token")
        else None,
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
        ControlPlaneConfig(listen=args.listen, db=args.db, credentials=_auth_config(args)),
        _agent_config(args),
    )


def _agent_args(p: argparse.ArgumentParser, *, metrics_default: str, health_default: str) -> None:
    from goleash.node.metrics import DEFAULT_TOP_SITES
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
        type=budget_arg,
        default=0.01,
        help=BUDGET_HELP.format(who="each process"),
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
        "--metrics-top-sites",
        type=int,
        default=DEFAULT_TOP_SITES,
        metavar="N",
        help=f"per process, series for the N sites with most live goroutines, the rest "
        f"summed as site 'other' (default {DEFAULT_TOP_SITES})",
    )
    g.add_argument(
        "--metrics-pid-label",
        action="store_true",
        help="label series with the pid too (a new series at every restart; without it, "
        "processes with the same service, namespace, pod and container are summed)",
    )
    g.add_argument(
        "--otlp-endpoint",
        metavar="HOST:PORT",
        help="also push the same metrics over OTLP/gRPC to this collector (needs "
        "pip install 'goleash[otlp]'; default $OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    g.add_argument(
        "--otlp-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between OTLP exports (default 30)",
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
    _token_args(g, "the agent role")
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
    _access_args(p, agent_tokens=False)
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


# --- check: the leak gate ------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from goleash.node.check import (
        CheckUsageError,
        IgnoreList,
        load_baseline,
        print_report,
        run_check,
        write_junit,
    )

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CheckUsageError("nothing to run: goleash check [OPTIONS] -- CMD [ARGS...]")
    ignore = IgnoreList.load(args.ignore_file) if args.ignore_file else IgnoreList()
    ignore.top.update(args.ignore_top)
    ignore.sites.update(args.ignore_site)
    ignore.functions.update(args.ignore_function)
    baseline = load_baseline(args.baseline) if args.baseline else set()
    rep = run_check(command, ignore=ignore, baseline=baseline, stdout_to_stderr=args.json)
    print_report(rep, as_json=args.json)
    if args.junit:
        write_junit(rep, args.junit)
    return rep.exit_status()


def _add_check_commands(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="run a command; fail when Go programs it starts leak goroutines (CI gate)",
        description=(
            "Run CMD (e.g. `go test ./...`) and follow every Go program it starts, "
            "transitively (the Go toolchain itself is skipped). Goroutines are attributed "
            "to the test that created them; one still blocked after its test ended, or "
            "blocked when its process exits, is a leak. Exit 1 on leaks, 0 clean, 2 on "
            "bad usage or environment; a non-zero exit of CMD is returned as is. Needs root."
        ),
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the report as JSON on stdout (the command's own stdout goes to stderr)",
    )
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML file")
    p.add_argument(
        "--ignore-top",
        action="append",
        default=[],
        metavar="FUNC",
        help="not a leak when FUNC is the topmost non-runtime frame (repeatable)",
    )
    p.add_argument(
        "--ignore-site",
        action="append",
        default=[],
        metavar="FILE:LINE",
        help="not a leak when created by the go statement at FILE:LINE (repeatable)",
    )
    p.add_argument(
        "--ignore-function",
        action="append",
        default=[],
        metavar="FUNC",
        help="not a leak when the goroutine started with FUNC (repeatable)",
    )
    p.add_argument(
        "--ignore-file",
        metavar="YAML",
        help="ignore list: `ignore: [{top: FUNC}, {site: FILE:LINE}, {function: FUNC}]`",
    )
    p.add_argument(
        "--baseline",
        metavar="REPORT.json",
        help="a stored --json report: fail only on leaks not in it",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(handler=cmd_check)


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


def _add_record_commands(sub: Any) -> None:
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
    _add_check_commands(sub)
    _add_record_commands(sub)

    _global_args(parser)  # for --help; parse_args() parses them with _globals_parser()
    for command in sub.choices.values():
        _log_args(command)
    parser.set_defaults(commands=sub.choices)
    return parser


_ONE_TARGET_COMMANDS = frozenset({"inspect", "symbolize", "trace", "latency", "panics", "dump"})


def _printable(text: str) -> str:
    """A message for a terminal: control characters that can come from a binary's or
    a process's strings (escape sequences, carriage returns) shown escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _globals_parser() -> tuple[argparse.ArgumentParser, dict[str, Any], frozenset[str]]:
    """The global options alone: a parser, their defaults, and those taking a value."""
    p = argparse.ArgumentParser(prog="goleash", add_help=False)
    defaults = _global_args(p)
    valued = frozenset(s for a in p._actions if a.nargs != 0 for s in a.option_strings)
    return p, defaults, valued


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Global options, the subcommand, then its options and positionals in any order.

    argparse alone would let a subcommand's defaults overwrite a global option given
    before it, report a subcommand's bad option with the top-level usage, and refuse
    an option between two positionals (`policy set --dry-run FILE`); so the line is
    split at the subcommand and its part parsed intermixed by its own parser."""
    parser = build_parser()
    _autocomplete(parser)
    commands: dict[str, argparse.ArgumentParser] = parser.get_default("commands")
    globals_parser, defaults, valued = _globals_parser()
    i = 0
    while i < len(argv) and argv[i] not in commands:
        name, eq, _ = argv[i].partition("=")
        if name not in valued:
            return parser.parse_args(argv)  # --help, --version or an error: top-level's
        i += 1 if eq else 2
    if i >= len(argv):
        return parser.parse_args(argv)  # no subcommand: argparse says which are known
    ns = globals_parser.parse_args(argv[:i])
    command = commands[argv[i]]
    # A command that runs another command line (`check -- CMD ARGS`) keeps that line
    # whole: argparse cannot intermix options with a REMAINDER positional.
    takes_command_line = any(a.nargs == argparse.REMAINDER for a in command._actions)
    parse = command.parse_args if takes_command_line else command.parse_intermixed_args
    args = parse(argv[i + 1 :], namespace=ns)
    args.command = argv[i]
    for key, value in defaults.items():  # commands without connection options
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Shell completion when the shell asks (`eval "$(register-python-argcomplete
    goleash)"`); argcomplete is optional: without it there is simply none."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


DAEMONS = frozenset(("agent", "control-plane", "run"))


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "command": self.command,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class TextLogFormatter(logging.Formatter):
    def __init__(self, command: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s goleash {command}: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _rfc3339(record.created)


def setup_logging(args: argparse.Namespace) -> None:
    """Root logging on stderr, as --log-level/--log-format say (the daemons' own
    basicConfig calls then find it set and change nothing)."""
    level = getattr(args, "log_level", None) or ("info" if args.command in DAEMONS else "warning")
    fmt = getattr(args, "log_format", None) or "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter(args.command) if fmt == "json" else TextLogFormatter(args.command)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        if getattr(old, "goleash_cli", False):
            root.removeHandler(old)
    handler.goleash_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args)
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
