"""The long-running commands: control-plane, agent, and run (both in one process)."""

from __future__ import annotations

import argparse
from typing import Any

from goleash.cli.options import (
    BUDGET_HELP,
    _access_args,
    _auth_config,
    _token_args,
    arg_pid,
    arg_seconds,
    arg_seconds_or_zero,
    budget_arg,
)
from goleash.errors import GoleashError


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
            external_url=args.external_url or "",
            otlp_endpoint=args.otlp_endpoint or _otlp_env(),
            otlp_interval=args.otlp_interval,
            events_max_age_seconds=args.events_max_age,
            events_max_bytes=args.events_max_bytes,
            evidence_listen=args.evidence_listen,
        )
    )


def _otlp_env() -> str | None:
    """The OpenTelemetry SDK's standard variables for the OTLP endpoint."""
    import os

    env = os.environ
    return env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")


# --- node agent, embedded run ------------------------------------------------------


def _agent_config(args: argparse.Namespace) -> Any:
    import os

    from goleash.control.auth import client_token
    from goleash.node.agentconfig import AgentConfig
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
        lifetimes=args.lifetimes,
        buffer_batches=args.buffer_batches,
    )


def cmd_agent(args: argparse.Namespace) -> int:
    from goleash.node.agent import serve
    from goleash.node.agentconfig import DEFAULT_SERVER

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
    _selection_args(p)
    _measure_args(p)
    _agent_own_args(p, metrics_default=metrics_default, health_default=health_default)


def _selection_args(p: argparse.ArgumentParser) -> None:
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


def _measure_args(p: argparse.ArgumentParser) -> None:
    from goleash.node import DEFAULT_ORPHAN_MIN_AGE_S

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
    g.add_argument(
        "--lifetimes",
        action="store_true",
        help="also trap goroutine exits (one more hit per goroutine) for exact per-site "
        "lifetimes; the budget may sample them",
    )


def _agent_own_args(
    p: argparse.ArgumentParser, *, metrics_default: str, health_default: str
) -> None:
    from goleash.node import DEFAULT_MAX_BATCHES, DEFAULT_TOP_SITES

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


def add_control_plane_command(sub: Any) -> None:
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
    _control_plane_endpoint_args(p)
    _event_log_args(p)
    p.set_defaults(handler=cmd_control_plane)


def _control_plane_endpoint_args(p: argparse.ArgumentParser) -> None:
    """Health, metrics, evidence and OTLP: what the control plane serves or pushes
    besides its gRPC API."""
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
        "at /evidence/NAME, for alerts to link to; guarded like the API: a viewer or admin "
        "token (curl -H 'Authorization: Bearer TOKEN' URL) or client certificate, HTTPS "
        "with --tls-cert, loopback only without credentials unless --insecure",
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


def _event_log_args(p: argparse.ArgumentParser) -> None:
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


def add_agent_commands(sub: Any) -> None:
    from goleash.control import DEFAULT_LISTEN, DEFAULT_SERVER
    from goleash.node import DEFAULT_HEALTH_LISTEN, DEFAULT_METRICS_LISTEN

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
