"""Agent ids belong to the identity that first wrote them, across control-plane
restarts (issue "Secure by default", the ownership of agent ids): with per-node
credentials, another node's agent that reconnects first after a restart must not take
a victim's agent id (and lock the victim out for as long as it keeps writing)."""

from __future__ import annotations

from pathlib import Path

import grpc
from test_control_plane import ControlPlaneProcess
from test_hostile_auth import _stream, _token_files, bearer, state

from agentsim import SimAgent, process_info, snapshot


def test_a_restart_does_not_hand_an_agent_id_to_another_node(tmp_path: Path) -> None:
    args = _token_files(tmp_path)
    cp = ControlPlaneProcess(tmp_path / "goleash.db", *args)
    victim = SimAgent("node-a-agent", "node-a")
    try:
        with grpc.insecure_channel(cp.address) as ch:
            assert _stream(ch, "node-a", [victim.batch(appeared=[process_info(10, "shop")])]) == (
                grpc.StatusCode.OK
            )
            # before the restart node-b is refused, as test_hostile_auth shows
            forged = SimAgent("node-a-agent", "node-a")
            assert _stream(ch, "node-b", [forged.batch()]) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert cp.stop() == 0
    cp = ControlPlaneProcess(tmp_path / "goleash.db", *args)  # same event log
    try:
        with grpc.insecure_channel(cp.address) as ch:
            # node-b reconnects first, under node-a's id, with node-a's processes gone
            forged = SimAgent("node-a-agent", "node-a")
            taken = _stream(
                ch,
                "node-b",
                [
                    forged.batch(
                        appeared=[process_info(11, "shop")], snapshots=[snapshot(11, goroutines=1)]
                    )
                ],
            )
            after = state(ch, bearer("admin"))["agents"]
            # then node-a comes back
            back = _stream(ch, "node-a", [victim.batch(snapshots=[snapshot(10, goroutines=5)])])
            assert (taken, back) == (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.OK,
            ), f"node-b: {taken.name}, node-a afterwards: {back.name}; agents {after}"
    finally:
        assert cp.stop() == 0
