"""Which identity owns each agent id, kept in the control plane's database.

An agent id is written by the principal that first wrote it, no other, so one node's
credential cannot jam or poison another's sequence. Kept in memory only, a restart
handed every known id to whoever reconnected first (and locked the real agent out):
claims live in the event log's database, and end when their agent has been silent
for the agent TTL (the Store forgets it then too). A claim's last contact is written
at most once a minute; a restart may shorten a claim by that much, never lengthen it.
"""

from __future__ import annotations

import logging
import sqlite3

from goleash.control.limits import PermissionDenied

log = logging.getLogger("goleash.control")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_owners (
    agent_id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    last_seen REAL NOT NULL
);
"""
TOUCH_SECONDS = 60.0  # how stale a stored last contact may be


class AgentOwners:
    def __init__(self, conn: sqlite3.Connection, ttl_seconds: float, cap: int, now: float) -> None:
        self._conn = conn
        self.ttl_seconds = ttl_seconds
        self.cap = cap
        self._owner: dict[str, str] = {}
        self._seen: dict[str, float] = {}  # last contact, in memory
        self._stored: dict[str, float] = {}  # last contact as written
        try:
            conn.executescript(_SCHEMA)
            rows = conn.execute(
                "SELECT agent_id, principal, last_seen FROM agent_owners "
                "WHERE last_seen >= ? ORDER BY last_seen DESC LIMIT ?",
                (now - ttl_seconds, cap),
            ).fetchall()
        except sqlite3.Error as exc:  # a claim table we cannot read: start with none
            log.warning("agent id claims not loaded: %s", exc)
            rows = []
        for agent_id, principal, seen in rows:
            self._owner[agent_id] = principal
            self._seen[agent_id] = self._stored[agent_id] = float(seen)

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, agent_id: str) -> str | None:
        return self._owner.get(agent_id)

    def check(self, agent_id: str, principal: str) -> None:
        owner = self._owner.get(agent_id)
        if owner is not None and owner != principal:
            raise PermissionDenied(
                f"agent id {agent_id[:128]!r} belongs to another identity; {principal} may "
                "only write agent ids of its own"
            )

    def claim(self, agent_id: str, principal: str, now: float) -> None:
        """`principal` writes `agent_id` from now on (checked first with check())."""
        if agent_id not in self._owner and len(self._owner) >= self.cap:
            self.expire(now)  # the Store's own cap refuses the batch if still full
        self._owner[agent_id] = principal
        self._write(agent_id, now)

    def touch(self, agent_id: str, now: float) -> None:
        """A batch from the owner: its claim lasts another TTL."""
        if agent_id not in self._owner:
            return
        self._seen[agent_id] = now
        if now - self._stored.get(agent_id, 0.0) >= TOUCH_SECONDS:
            self._write(agent_id, now)

    def expire(self, now: float) -> None:
        """Forget claims silent for longer than the TTL."""
        horizon = now - self.ttl_seconds
        for agent_id in [a for a, seen in self._seen.items() if seen < horizon]:
            del self._owner[agent_id], self._seen[agent_id]
            self._stored.pop(agent_id, None)
        try:
            self._conn.execute("DELETE FROM agent_owners WHERE last_seen < ?", (horizon,))
        except sqlite3.Error as exc:
            log.warning("agent id claims not pruned: %s", exc)

    def _write(self, agent_id: str, now: float) -> None:
        self._seen[agent_id] = now
        try:
            self._conn.execute(
                "INSERT INTO agent_owners (agent_id, principal, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT(agent_id) DO UPDATE SET principal = excluded.principal, "
                "last_seen = excluded.last_seen",
                (agent_id, self._owner[agent_id], now),
            )
            self._stored[agent_id] = now
        except sqlite3.Error as exc:  # memory still holds the claim
            log.warning("agent id claim for %r not stored: %s", agent_id[:128], exc)
