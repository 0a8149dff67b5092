"""The running policy and manual overrides, as the API sees them.

This module owns what SetPolicy/GetPolicy/OverrideService need: YAML validated
before it replaces the running policy (a rejection names the line and the reason),
versions kept in the control plane's database so a restart resumes the last
accepted policy, and overrides with expiry.

`accept_policy` is the one way a policy text becomes the running one, from the API
or a file: it is parsed and compiled once (`compile_policy`), the compiled form is
kept with its version (`PolicyVersion.compiled`, what the engine runs), and one
event records the outcome.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.events import EventLog
from goleash.control.limits import InvalidArgument
from goleash.control.policytext import (
    MODES,
    TOP_LEVEL_KEYS,
    PolicyDocument,
    PolicyError,
    parse_policy,
)
from goleash.control.rules import CompiledPolicy, compile_document

# The names callers imported from here before `policytext` existed.
__all__ = [
    "MODES",
    "TOP_LEVEL_KEYS",
    "Override",
    "PolicyDocument",
    "PolicyError",
    "PolicyStore",
    "PolicyVersion",
    "accept_policy",
    "check_override",
    "compile_policy",
    "validate_policy",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    version INTEGER PRIMARY KEY,
    yaml TEXT NOT NULL,
    source TEXT NOT NULL,
    set_unix_nano INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS overrides (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    action INTEGER NOT NULL,
    rule TEXT NOT NULL DEFAULT '',
    level TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    created_unix_nano INTEGER NOT NULL,
    expires_unix_nano INTEGER NOT NULL DEFAULT 0,
    cleared INTEGER NOT NULL DEFAULT 0
);
"""


def compile_policy(text: str, version: int = 0) -> tuple[PolicyDocument, CompiledPolicy]:
    """Parse and compile a policy once; PolicyError(line, reason) on the first problem."""
    doc = parse_policy(text)
    # the engine's own checks (signals, thresholds, levels, actions), each with its line
    return doc, compile_document(doc, version)


def validate_policy(text: str) -> PolicyDocument:
    """Check a policy the way `compile_policy` does, keeping only the document."""
    return compile_policy(text)[0]


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    document: PolicyDocument
    source: str
    set_at: float
    compiled: CompiledPolicy  # what the engine runs, compiled when the text was accepted


@dataclass(frozen=True)
class Override:
    """A manual override; `action` is a goleash.v1.OverrideAction number."""

    id: int
    service: str
    action: int
    rule: str
    level: str
    reason: str
    created: float
    expires: float  # 0: until cleared


MAX_OVERRIDE_SECONDS = 30 * 86400.0


def check_override(rule: str, level: str, reason: str, duration: float) -> None:
    """Everything about an override that can go wrong, checked before any state
    changes (InvalidArgument): a NaN duration would be permanent, infinity overflows."""
    if not math.isfinite(duration) or not 0 <= duration <= MAX_OVERRIDE_SECONDS:
        raise InvalidArgument(
            f"duration_seconds must be a finite number from 0 (until cleared) to "
            f"{MAX_OVERRIDE_SECONDS:g} (30 days), got {duration}"
        )
    for what, value, limit in (("rule", rule, 253), ("level", level, 64), ("reason", reason, 1024)):
        if len(value) > limit:
            raise InvalidArgument(f"{what} is {len(value)} characters long; at most {limit}")


class PolicyStore:
    """Running policy and overrides, persisted in the control plane's database."""

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock
        conn.executescript(_SCHEMA)
        self._current: PolicyVersion | None = None
        row = conn.execute(
            "SELECT version, yaml, source, set_unix_nano FROM policies "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            # It passed validation when accepted; a rule change in the validator must
            # not stop the control plane from starting, so keep it even if it fails now.
            try:
                doc, compiled = compile_policy(row[1], row[0])
            except PolicyError:
                doc = PolicyDocument(text=row[1], mode="monitor", rules=())
                compiled = CompiledPolicy(version=row[0], mode="monitor", interval=10.0, rules=())
            self._current = PolicyVersion(row[0], doc, row[2], row[3] / 1e9, compiled)

    @property
    def current(self) -> PolicyVersion | None:
        return self._current

    def set(self, text: str, source: str) -> PolicyVersion:
        """Validate and make `text` the running policy (PolicyError leaves it unchanged)."""
        version = (self._current.version if self._current else 0) + 1
        doc, compiled = compile_policy(text, version)
        now = self._clock()
        self._conn.execute(
            "INSERT INTO policies (version, yaml, source, set_unix_nano) VALUES (?, ?, ?, ?)",
            (version, text, source, int(now * 1e9)),
        )
        self._current = PolicyVersion(version, doc, source, now, compiled)
        return self._current

    def add_override(
        self, service: str, action: int, rule: str, level: str, reason: str, duration: float
    ) -> Override:
        check_override(rule, level, reason, duration)
        now = self._clock()
        expires = now + duration if duration > 0 else 0.0
        cur = self._conn.execute(
            "INSERT INTO overrides (service, action, rule, level, reason, created_unix_nano, "
            "expires_unix_nano) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (service, action, rule, level, reason, int(now * 1e9), int(expires * 1e9)),
        )
        return Override(int(cur.lastrowid or 0), service, action, rule, level, reason, now, expires)

    def clear_overrides(self, service: str, *, action: int = 0, rule: str = "") -> int:
        """Clear the service's active overrides (only `action`/`rule` ones when given)."""
        sql = (
            "UPDATE overrides SET cleared = 1 WHERE cleared = 0 AND service = ? "
            "AND (expires_unix_nano = 0 OR expires_unix_nano > ?)"
        )
        args: list[Any] = [service, int(self._clock() * 1e9)]
        if action:
            sql += " AND action = ?"
            args.append(action)
        if rule:
            sql += " AND rule = ?"
            args.append(rule)
        return self._conn.execute(sql, args).rowcount

    def active_overrides(self, service: str = "") -> list[Override]:
        now_ns = int(self._clock() * 1e9)
        sql = (
            "SELECT id, service, action, rule, level, reason, created_unix_nano, "
            "expires_unix_nano FROM overrides WHERE cleared = 0 "
            "AND (expires_unix_nano = 0 OR expires_unix_nano > ?)"
        )
        args: list[Any] = [now_ns]
        if service:
            sql += " AND service = ?"
            args.append(service)
        return [
            Override(r[0], r[1], r[2], r[3], r[4], r[5], r[6] / 1e9, r[7] / 1e9)
            for r in self._conn.execute(sql + " ORDER BY id", args)
        ]


def accept_policy(
    policies: PolicyStore, events: EventLog, text: str, source: str, *, identity: str = ""
) -> PolicyVersion:
    """Make `text` the running policy and write the one event that says so; on a
    rejection write POLICY_REJECTED and re-raise the PolicyError (the running policy
    stays).

    `identity` is who set it through the API (empty for a policy file). An API
    rejection keeps the reason out of the event log: it may quote a value of the
    rejected text (a header, a token), and the caller got it in the status. A policy
    file is the operator's own, so its rejection carries the reason to the log, the
    only place the operator can read it.
    """
    running = policies.current.version if policies.current else 0
    try:
        accepted = policies.set(text, source)
    except PolicyError as exc:
        if identity:
            message = (
                f"policy from {identity} rejected (line {exc.line}); version {running} keeps "
                "running"
            )
            details: dict[str, Any] = {
                "line": exc.line,
                "running_version": running,
                "identity": identity,
            }
        else:
            message = f"policy from {source} rejected ({exc}); version {running} keeps running"
            details = {
                "line": exc.line,
                "reason": exc.reason,
                "source": source,
                "running_version": running,
            }
        events.append(t.EVENT_KIND_POLICY_REJECTED, message, details=details)
        raise
    doc = accepted.document
    summary = f"({doc.mode}, {len(doc.rules)} rule(s))"
    if identity:
        message = f"policy version {accepted.version} running {summary}, set by {identity}"
        details = {
            "version": accepted.version,
            "mode": doc.mode,
            "rules": len(doc.rules),
            "identity": identity,
        }
    else:
        message = f"policy version {accepted.version} from {source} running {summary}"
        details = {"version": accepted.version, "mode": doc.mode, "source": source}
    events.append(t.EVENT_KIND_POLICY_SET, message, details=details)
    return accepted
