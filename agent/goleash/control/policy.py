"""The running policy and manual overrides, as the API sees them.

This module owns what SetPolicy/GetPolicy/OverrideService need: YAML validated
before it replaces the running policy (a rejection names the line and the reason),
versions kept in the control plane's database so a restart resumes the last
accepted policy, and overrides with expiry. The policy engine that evaluates rules
and fires actions builds on `PolicyDocument` (issue 6); `validate_policy` is the one
gate every policy text passes, from the API or a file.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from goleash.control.limits import InvalidArgument
from goleash.errors import GoleashError

MODES = ("enforce", "monitor", "off")
# Top-level keys a policy may have; the engine reads the ones it knows.
TOP_LEVEL_KEYS = (
    "mode",
    "rules",
    "levels",
    "defaults",
    "actions",
    "cooldown",
    "blast_radius",
    "evaluation_interval",
)

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


class PolicyError(GoleashError):
    """A policy text that cannot run; `line` is 1-based (0 when not tied to a line)."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}" if line else reason)


@dataclass(frozen=True)
class PolicyDocument:
    """A validated policy."""

    text: str
    mode: str
    rules: tuple[dict[str, Any], ...]
    raw: dict[str, Any] = field(default_factory=dict)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _no_duplicate_keys(root: yaml.Node) -> None:
    """YAML lets a later key silently replace an earlier one; a policy must not (the
    reader sees one threshold, the engine runs the other). Walked without recursion:
    nesting depth is the author's."""
    todo = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise PolicyError(
                            _line(k),
                            f"key {k.value!r} appears twice in one mapping "
                            f"(first on line {seen[k.value]})",
                        )
                    seen[k.value] = _line(k)
                todo.append(v)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)


def validate_policy(text: str) -> PolicyDocument:
    """Parse and check a policy; raise PolicyError(line, reason) on the first problem."""
    if not text.strip():
        raise PolicyError(0, "the policy is empty")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError(line, f"not valid YAML: {exc.problem or exc.context}") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise PolicyError(0, f"not valid YAML: {type(exc).__name__}") from exc
    if root is not None:
        _no_duplicate_keys(root)
    if not isinstance(root, yaml.MappingNode) or not isinstance(raw, dict):
        raise PolicyError(1, "a policy is a mapping (keys like mode:, rules:)")
    keys = {k.value: (k, v) for k, v in root.value}
    for name, (knode, _) in keys.items():
        if name not in TOP_LEVEL_KEYS:
            raise PolicyError(
                _line(knode), f"unknown key {name!r} (known: {', '.join(TOP_LEVEL_KEYS)})"
            )
    mode = raw.get("mode", "monitor")
    if mode is False:  # YAML 1.1 reads a bare `mode: off` as false
        mode = "off"
    if mode not in MODES:
        raise PolicyError(_line(keys["mode"][1]), f"mode must be one of {', '.join(MODES)}")
    rules_node = keys.get("rules", (None, None))[1]
    rules = raw.get("rules") or []
    if rules_node is not None and not isinstance(rules, list):
        raise PolicyError(_line(rules_node), "rules must be a list")
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        node = rules_node.value[i] if isinstance(rules_node, yaml.SequenceNode) else root
        if not isinstance(rule, dict):
            raise PolicyError(_line(node), "each rule is a mapping with at least name: and signal:")
        name = rule.get("name")
        if not isinstance(name, str) or not name:
            raise PolicyError(_line(node), "a rule needs a name: (a non-empty string)")
        if name in seen:
            raise PolicyError(_line(node), f"rule name {name!r} is used twice")
        seen.add(name)
        if "signal" not in rule:
            raise PolicyError(_line(node), f"rule {name!r} needs a signal:")
    doc = PolicyDocument(text=text, mode=mode, rules=tuple(rules), raw=raw)
    # the engine's own checks (signals, thresholds, levels, actions), each with its line
    from goleash.control.rules import compile_document

    compile_document(doc)
    return doc


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    document: PolicyDocument
    source: str
    set_at: float


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
                doc = validate_policy(row[1])
            except PolicyError:
                doc = PolicyDocument(text=row[1], mode="monitor", rules=())
            self._current = PolicyVersion(row[0], doc, row[2], row[3] / 1e9)

    @property
    def current(self) -> PolicyVersion | None:
        return self._current

    def set(self, text: str, source: str) -> PolicyVersion:
        """Validate and make `text` the running policy (PolicyError leaves it unchanged)."""
        doc = validate_policy(text)
        version = (self._current.version if self._current else 0) + 1
        now = self._clock()
        self._conn.execute(
            "INSERT INTO policies (version, yaml, source, set_unix_nano) VALUES (?, ?, ?, ?)",
            (version, text, source, int(now * 1e9)),
        )
        self._current = PolicyVersion(version, doc, source, now)
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
