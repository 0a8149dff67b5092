"""How the node agent is configured: its settings and defaults, and the address check
refused at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from goleash.errors import GoleashError
from goleash.node import DEFAULT_HEALTH_LISTEN, DEFAULT_METRICS_LISTEN
from goleash.node.discovery import Selector
from goleash.node.export import DEFAULT_MAX_KEPT
from goleash.node.metrics import DEFAULT_TOP_SITES
from goleash.node.sender import DEFAULT_MAX_BATCHES
from goleash.node.tracker import DEFAULT_ORPHAN_MIN_AGE_S

DEFAULT_SERVER = "127.0.0.1:7070"  # the control plane's default (goleash.control)


@dataclass
class AgentConfig:
    """How to run the agent (CLI flags map one to one)."""

    server: str = DEFAULT_SERVER
    selector: Selector = field(default_factory=Selector)
    interval: float = 5.0
    node_name: str | None = None  # default: $NODE_NAME, else the host name
    agent_id: str | None = None  # default: node name + boot id
    funcs: tuple[str, ...] = ()
    panics: bool = False
    health_listen: str | None = DEFAULT_HEALTH_LISTEN  # None: no health endpoint
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN  # None: no /metrics
    metrics_top_sites: int = DEFAULT_TOP_SITES  # per process; the rest is one "other"
    metrics_pid_label: bool = False  # pid as a label: a new series at every restart
    otlp_endpoint: str | None = None  # also push the metrics over OTLP/gRPC there
    otlp_interval: float = 30.0
    host_root: str = "/"
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    orphan_min_age_s: float = DEFAULT_ORPHAN_MIN_AGE_S
    budget_fraction: float = 0.01
    stacks: bool = False
    lifetimes: bool = False  # trap goroutine exits too: exact per-site lifetimes
    buffer_batches: int = DEFAULT_MAX_BATCHES
    max_message_bytes: int = 8 * 1024 * 1024
    max_kept: int = DEFAULT_MAX_KEPT
    scan_interval: float = 1.0


def check_server_address(server: str) -> None:
    """A whole-agent fault, refused at start (exit 2): a control-plane address that
    can never work. gRPC target schemes (dns:///, unix:) are left to gRPC."""
    if "://" in server or server.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return
    host, sep, port = server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or any(c.isspace() for c in server) or not port.isdigit():
        raise GoleashError(f"--server {server!r}: not HOST:PORT (e.g. goleash:7070)")
    if not 0 < int(port) < 65536:
        raise GoleashError(f"--server {server!r}: port {port} is not in 1-65535")
