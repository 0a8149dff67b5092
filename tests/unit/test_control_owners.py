"""Agent id claims: kept across a restart (same database), ended by the agent TTL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from goleash.control.limits import PermissionDenied
from goleash.control.owners import TOUCH_SECONDS, AgentOwners

TTL = 3600.0


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_a_claim_survives_a_restart_and_refuses_another_identity(tmp_path: Path) -> None:
    owners = AgentOwners(_db(tmp_path / "g.db"), TTL, 10, now=1000.0)
    owners.check("node-a-1", "node-a")
    owners.claim("node-a-1", "node-a", 1000.0)
    again = AgentOwners(_db(tmp_path / "g.db"), TTL, 10, now=1010.0)
    assert again.owner("node-a-1") == "node-a"
    again.check("node-a-1", "node-a")
    with pytest.raises(PermissionDenied, match="belongs to another identity"):
        again.check("node-a-1", "node-b")


def test_a_claim_ends_after_the_ttl_of_silence_and_batches_extend_it(tmp_path: Path) -> None:
    owners = AgentOwners(_db(tmp_path / "g.db"), TTL, 10, now=0.0)
    owners.claim("a", "node-a", 0.0)
    owners.claim("b", "node-b", 0.0)
    owners.touch("a", TTL - 1)  # a batch just before b's claim runs out
    owners.expire(TTL + 1)
    assert (owners.owner("a"), owners.owner("b")) == ("node-a", None)
    owners.check("b", "node-c")  # free again
    # what a restart loads: a's contact was stored (older than TOUCH_SECONDS), b is gone
    loaded = AgentOwners(_db(tmp_path / "g.db"), TTL, 10, now=TTL + 2)
    assert (loaded.owner("a"), loaded.owner("b")) == ("node-a", None)
    assert TTL - 1 >= TOUCH_SECONDS


def test_claims_loaded_at_start_are_capped(tmp_path: Path) -> None:
    owners = AgentOwners(_db(tmp_path / "g.db"), TTL, 100, now=0.0)
    for i in range(20):
        owners.claim(f"agent-{i}", f"node-{i}", float(i))
    loaded = AgentOwners(_db(tmp_path / "g.db"), TTL, 5, now=30.0)
    assert len(loaded) == 5
    assert loaded.owner("agent-19") == "node-19"  # the most recent ones
