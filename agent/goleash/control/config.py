"""How to run the control plane: the settings `goleash control-plane`'s flags map to."""

from __future__ import annotations

from dataclasses import dataclass, field

from goleash.control import DEFAULT_LISTEN, DEFAULT_MAX_MESSAGE_BYTES, auth
from goleash.control.detect import DEFAULT_LEAK_PARAMS, LeakParams
from goleash.control.events import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_BYTES


@dataclass
class ControlPlaneConfig:
    """How to run the control plane (CLI flags map one to one)."""

    listen: str = DEFAULT_LISTEN
    db: str | None = None  # file or directory; None: /var/lib/goleash/goleash.db
    credentials: auth.AuthConfig = field(default_factory=auth.AuthConfig)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # set: clients must present a certificate it signed
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    upkeep_seconds: float = 5.0  # pruning and leak detection period
    full_gc_seconds: float = 600.0  # full garbage collection period (0: Python's default)
    leak: LeakParams = DEFAULT_LEAK_PARAMS
    policy_file: str | None = None  # hot-reloaded; validated before it replaces the running one
    report_dir: str | None = None  # flame graphs of decisions; None: reports/ beside the db
    # plaintext grpc.health.v1 only (the kubelet's gRPC probes cannot speak TLS)
    health_listen: str | None = None
    metrics_listen: str | None = None  # Prometheus /metrics over HTTP
    # the policy engine's evidence files over HTTP (/evidence/NAME), for alerts' links
    evidence_listen: str | None = None
    # how users reach this control plane's evidence server (alerts' generatorURL);
    # default: http://<evidence_listen address>
    external_url: str = ""
    otlp_endpoint: str | None = None  # also push the metrics over OTLP/gRPC there
    otlp_interval: float = 30.0
    events_max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS  # event log retention
    events_max_bytes: int = DEFAULT_MAX_BYTES
