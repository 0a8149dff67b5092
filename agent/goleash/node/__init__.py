"""The node agent. The defaults the CLI shows live here, so building the command
line does not import the agent (grpc, prometheus, the probes: ~1 s)."""

DEFAULT_HEALTH_LISTEN = "127.0.0.1:7071"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_TOP_SITES = 20  # per process; the rest is one "other" series
DEFAULT_MAX_BATCHES = 120  # ten minutes at the default 5 s interval
DEFAULT_ORPHAN_MIN_AGE_S = 30.0
