"""The durable event log: SQLite, one row per event, ids that never repeat.

Every decision the control plane takes is written here with its evidence, and the
log survives restarts (WAL journal: a committed event survives a crash of the
process). Watchers subscribe to new events in-process; `WatchEvents` replays the log
from an id first, so a client that reconnects with the last id it saw misses nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError

DEFAULT_DIR = Path("/var/lib/goleash")
DEFAULT_DB = DEFAULT_DIR / "goleash.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_unix_nano INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    service TEXT NOT NULL DEFAULT '',
    agent_id TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, id);
CREATE INDEX IF NOT EXISTS events_service ON events (service, id);
"""


class EventLogError(GoleashError):
    """The event database cannot be opened or written."""


@dataclass(frozen=True)
class EventRecord:
    """One logged event; `kind` is a goleash.v1.EventKind number."""

    id: int
    time: float
    kind: int
    message: str
    service: str = ""
    agent_id: str = ""
    pid: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventQuery:
    """Filter: empty fields match everything."""

    kinds: frozenset[int] = frozenset()
    service: str = ""
    agent_id: str = ""
    pid: int = 0

    def matches(self, e: EventRecord) -> bool:
        return (
            (not self.kinds or e.kind in self.kinds)
            and (not self.service or e.service == self.service)
            and (not self.agent_id or e.agent_id == self.agent_id)
            and (not self.pid or e.pid == self.pid)
        )


def resolve_db_path(path: str | os.PathLike[str] | None) -> str:
    """The database file to use: `path` (a file, or a directory to put goleash.db in),
    else /var/lib/goleash/goleash.db. ':memory:' keeps everything in memory."""
    if path is None:
        target = DEFAULT_DB
    elif str(path) == ":memory:":
        return ":memory:"
    else:
        target = Path(path)
        if target.is_dir():
            target = target / DEFAULT_DB.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EventLogError(
            f"cannot create {target.parent} for the event log ({exc.strerror}); "
            "give a writable file with --db PATH"
        ) from exc
    return str(target)


def open_db(path: str) -> sqlite3.Connection:
    """Open (creating) the control plane's database."""
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        raise EventLogError(f"cannot open the event log {path}: {exc}; give --db PATH") from exc
    return conn


class EventLog:
    """Append-only event log over an open database connection."""

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        self._subscribers: list[Callable[[EventRecord], None]] = []

    def append(
        self,
        kind: int,
        message: str,
        *,
        service: str = "",
        agent_id: str = "",
        pid: int = 0,
        details: dict[str, Any] | None = None,
    ) -> EventRecord:
        now = self._clock()
        body = details or {}
        try:
            cur = self._conn.execute(
                "INSERT INTO events (time_unix_nano, kind, service, agent_id, pid, message, "
                "details) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (int(now * 1e9), kind, service, agent_id, pid, message, json.dumps(body)),
            )
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot write the event log: {exc}") from exc
        rec = EventRecord(int(cur.lastrowid or 0), now, kind, message, service, agent_id, pid, body)
        for notify in list(self._subscribers):
            notify(rec)
        return rec

    def subscribe(self, callback: Callable[[EventRecord], None]) -> Callable[[], None]:
        """Call `callback` for every new event (in the appending thread); returns the
        function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def last_id(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        return int(row[0])

    def query(
        self,
        where: EventQuery = EventQuery(),
        *,
        after_id: int = 0,
        before_id: int = 0,
        newest_first: bool = False,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Events with after_id < id (< before_id when set) matching `where`."""
        sql = [
            "SELECT id, time_unix_nano, kind, message, service, agent_id, pid, details "
            "FROM events WHERE id > ?"
        ]
        args: list[Any] = [after_id]
        if before_id:
            sql.append("AND id < ?")
            args.append(before_id)
        if where.kinds:
            sql.append(f"AND kind IN ({','.join('?' * len(where.kinds))})")
            args.extend(sorted(where.kinds))
        for column in ("service", "agent_id", "pid"):
            value = getattr(where, column)
            if value:
                sql.append(f"AND {column} = ?")
                args.append(value)
        sql.append(f"ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?")
        args.append(limit)
        rows = self._conn.execute(" ".join(sql), args).fetchall()
        return [
            EventRecord(r[0], r[1] / 1e9, r[2], r[3], r[4], r[5], r[6], json.loads(r[7]))
            for r in rows
        ]

    def iter_kinds(self, kinds: Iterable[int]) -> Iterable[EventRecord]:
        """Every event of `kinds`, oldest first, in pages (for rebuilding state at start)."""
        after = 0
        where = EventQuery(kinds=frozenset(kinds))
        while True:
            page = self.query(where, after_id=after, limit=1000)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1].id
