"""The durable event log: SQLite, one row per event, ids that never repeat.

Every decision the control plane takes is written here with its evidence, and the
log survives restarts (WAL journal: a committed event survives a crash of the
process). Watchers subscribe to new events in-process; `WatchEvents` replays the log
from an id first, so a client that reconnects with the last id it saw misses nothing.
"""

from __future__ import annotations

import json
import math
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
# Retention: the log is a ring, not an archive. Events older than the age go, and the
# oldest go first while the data pages outgrow the size, so the database (and the
# volume under it) has a ceiling whatever the agents send.
DEFAULT_MAX_AGE_SECONDS = 30 * 86400.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_MESSAGE_CHARS = 4096
MAX_DETAILS_BYTES = 64 * 1024

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


def _finite(v: Any) -> Any:
    """`v` with NaN and infinities as None (details are shallow: built here)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


class EventLog:
    """Append-only event log over an open database connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        clock: Callable[[], float] = time.time,
        *,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if not (math.isfinite(max_age_seconds) and max_age_seconds > 0 and max_bytes > 0):
            raise EventLogError(
                "event retention needs a finite age > 0 and a size > 0 "
                "(--events-max-age, --events-max-bytes)"
            )
        self._conn = conn
        self._clock = clock
        self.max_age_seconds = max_age_seconds
        self.max_bytes = max_bytes
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
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        # NaN and infinity are not JSON (other readers of the log would choke on them)
        try:
            text = json.dumps(body, default=str, allow_nan=False)
        except ValueError:
            text = json.dumps(_finite(body), default=str)
        if len(text) > MAX_DETAILS_BYTES:
            body = {"truncated": True, "bytes": len(text)}
            text = json.dumps(body)
        try:
            cur = self._conn.execute(
                "INSERT INTO events (time_unix_nano, kind, service, agent_id, pid, message, "
                "details) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (int(now * 1e9), kind, service, agent_id, pid, message, text),
            )
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot write the event log: {exc}") from exc
        rec = EventRecord(int(cur.lastrowid or 0), now, kind, message, service, agent_id, pid, body)
        for notify in list(self._subscribers):
            notify(rec)
        return rec

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (free pages are reused before it grows)."""
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def prune(self) -> int:
        """Apply the retention: drop events older than the age, then the oldest while
        the database is over its size. Returns how many were dropped."""
        cutoff = int((self._clock() - self.max_age_seconds) * 1e9)
        dropped = 0
        try:
            # ids grow with time: the first young event bounds the old ones (a scan of
            # only what is dropped, no index on time needed)
            row = self._conn.execute(
                "SELECT id FROM events WHERE time_unix_nano >= ? ORDER BY id LIMIT 1", (cutoff,)
            ).fetchone()
            bound = row[0] if row else self.last_id() + 1
            dropped += self._conn.execute("DELETE FROM events WHERE id < ?", (bound,)).rowcount
            for _ in range(20):  # each round drops a tenth (at least 100 events)
                used = self.used_bytes()
                if used <= self.max_bytes:
                    break
                n = self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                if not n:
                    break
                cut = max(n // 10, min(n, 100))
                dropped += self._conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                    (cut,),
                ).rowcount
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot apply the event retention: {exc}") from exc
        return dropped

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
