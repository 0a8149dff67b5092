"""The control plane: ingest from agents, time windows, queries, detection, event log.

Never imports bcc, goleash.probes or goleash.node (DESIGN.md): it knows the API
messages only. Constants here are cheap to import (the CLI builds its parser with
them without loading gRPC).
"""

DEFAULT_LISTEN = "127.0.0.1:7070"  # the control plane binds loopback unless told otherwise
DEFAULT_SERVER = DEFAULT_LISTEN  # where clients look for it
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
