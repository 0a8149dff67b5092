"""Who this agent is: its node name, and an agent id stable while the host runs."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path

from goleash import __version__
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.node.agentconfig import AgentConfig


def _first_line(paths: Sequence[Path]) -> str:
    for p in paths:
        try:
            line = p.read_text().strip().splitlines()
        except OSError:
            continue
        if line and line[0].strip():
            return line[0].strip()
    return ""


def node_name(configured: str | None, host_root: str) -> str:
    root = Path(host_root)
    return (
        configured
        or os.environ.get("NODE_NAME")
        or _first_line([root / "etc/hostname"])
        or socket.gethostname()
    )


def agent_identity(cfg: AgentConfig) -> t.AgentIdentity:
    """agent_id: configured, else node name + this boot's id (stable while the host
    runs, new after a reboot, when every PID is new anyway)."""
    node = node_name(cfg.node_name, cfg.host_root)
    boot = _first_line(
        [
            Path(cfg.host_root) / "proc/sys/kernel/random/boot_id",
            Path("/proc/sys/kernel/random/boot_id"),
        ]
    )
    agent_id = cfg.agent_id or (f"{node}-{boot[:8]}" if boot else node)
    return t.AgentIdentity(
        agent_id=agent_id, node_name=node, instance_id=uuid.uuid4().hex, version=__version__
    )
