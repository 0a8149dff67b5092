"""`goleash run`: the node agent and the control plane in one process.

This module sits where cli.py sits in the import graph (DESIGN.md): it is the one
place that imports both `node` and `control`. They still meet only through the API:
the control plane serves gRPC on its address (loopback by default) and the agent
streams to it over a real gRPC channel, exactly as a remote agent would. The control
plane runs on its own asyncio loop in a thread; the agent's loop is the main thread.

On loopback with no credentials configured nothing is authenticated (zero-config).
When authentication is on (tokens for people, or a non-loopback --listen), the
embedded agent gets a token of the agent role made for this process only, so only
the people's tokens need configuring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import secrets
import threading

from goleash.control.auth import Authenticator, Role
from goleash.control.server import ControlPlane, ControlPlaneConfig
from goleash.errors import GoleashError
from goleash.node.agent import Agent, describe
from goleash.node.agentconfig import AgentConfig
from goleash.signals import stop_on_signals

log = logging.getLogger("goleash.run")


class EmbeddedControlPlane:
    """A ControlPlane served from a background thread's event loop."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="control-plane")
        self.cp: ControlPlane | None = None
        self.address = ""

    def start(self) -> str:
        self._thread.start()

        async def boot() -> str:
            self.cp = ControlPlane(self.config)
            return await self.cp.start()

        fut = asyncio.run_coroutine_threadsafe(boot(), self._loop)
        try:
            self.address = fut.result(timeout=30)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            raise
        return self.address

    def stop(self) -> None:
        if self.cp is not None:
            fut = asyncio.run_coroutine_threadsafe(self.cp.stop(), self._loop)
            try:
                fut.result(timeout=10)
            except (concurrent.futures.TimeoutError, GoleashError):
                log.warning("the control plane did not stop cleanly")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def dial_address(bound: str) -> str:
    """Where the agent dials a control plane bound to `bound` (a wildcard host is
    reached over loopback)."""
    host, _, port = bound.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        return f"127.0.0.1:{port}"
    return bound


def embedded_agent_token(cp_config: ControlPlaneConfig) -> str | None:
    """When the control plane authenticates, a token of the agent role made for this
    process only (added to cp_config), which the embedded agent sends; else None."""
    creds = cp_config.credentials
    if not Authenticator.from_config(creds).enabled:
        return None
    own = secrets.token_hex(32)
    tokens = {**creds.tokens, Role.AGENT: (*creds.tokens.get(Role.AGENT, ()), own)}
    cp_config.credentials = dataclasses.replace(creds, tokens=tokens)
    return own


def serve(cp_config: ControlPlaneConfig, agent_config: AgentConfig) -> int:
    """Run both until SIGTERM/SIGINT. The agent's `server` is set to the control plane."""
    logging.basicConfig(level=logging.INFO, format="goleash run: %(message)s")
    with stop_on_signals() as stop:
        agent_config.token = embedded_agent_token(cp_config)
        cp = EmbeddedControlPlane(cp_config)
        address = cp.start()
        try:
            assert cp.cp is not None
            log.info("control plane listening on %s (events in %s)", address, cp.cp.db_path)
            agent_config.server = dial_address(address)
            agent = Agent(agent_config)
            agent.open_endpoints()
            agent.run(stop, on_started=lambda: log.info("%s", describe(agent)))
        finally:
            cp.stop()
    return 0
