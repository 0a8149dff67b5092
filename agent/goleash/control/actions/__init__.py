"""What the policy engine does to a service: degrade it (HTTP/2 off) and undo that.

Every action type has `apply` (degrade) and `undo` (recover), both idempotent: doing
one twice leaves the world as doing it once, and says so ("already in place"). The
runner retries a failed attempt with exponential backoff and reports every attempt
(outcome, error, the evidence that caused it) through a callback the engine wires
to the event log.

Types: `kubernetes` (patch the workload's env: a rolling restart), `exec` (a command
with the decision in its environment and as JSON on stdin), `alertmanager` (alerts
posted to Alertmanager's API: routing, grouping and silences apply), `webhook` (an
Alertmanager v4 notification POSTed straight to a receiver), `file` (a flag file a
service or proxy watches), `event` (nothing but the decision itself, which
`WatchEvents` subscribers receive).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from goleash.errors import GoleashError

HTTP2_OFF = {"GODEBUG": "http2client=0,http2server=0"}
DEGRADE, RECOVER = "degrade", "recover"


class ActionError(GoleashError):
    """An attempt failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ActionSpecError(GoleashError):
    """An action in a policy is malformed (`field` names the key at fault)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ActionContext:
    """One decision, as an action sees it."""

    decision_id: int
    direction: str  # DEGRADE or RECOVER
    service: str
    rule: str
    level: str  # the level entered (degrade) or left (recover)
    from_level: str
    to_level: str
    reason: str
    mode: str  # enforce (monitor never runs actions)
    time: float
    degraded_since: float  # when the level being left was entered (recover), else time
    evidence: dict[str, Any] = field(default_factory=dict)
    # Kubernetes placement of the service's processes, when the agents knew it:
    # namespace, workload_kind, workload_name, container.
    kubernetes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "decision": self.direction,
            "service": self.service,
            "rule": self.rule,
            "level": self.level,
            "from_level": self.from_level,
            "to_level": self.to_level,
            "reason": self.reason,
            "mode": self.mode,
            "time_unix": self.time,
            "degraded_since_unix": self.degraded_since,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class Retry:
    attempts: int = 4  # first try + 3 retries
    initial: float = 1.0  # seconds before the first retry
    factor: float = 2.0
    max_delay: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.initial * self.factor ** (attempt - 1), self.max_delay)


class Action:
    """Base of the action types; subclasses set `type` and implement apply/undo."""

    type = ""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.retry = Retry(
            attempts=int(spec.get("retries", 3)) + 1,
            initial=float(spec.get("retry_initial_seconds", 1.0)),
            max_delay=float(spec.get("retry_max_seconds", 30.0)),
        )

    def key(self, service: str) -> str:
        """What this action changes for `service`: two rules that change the same
        thing share it, so the first degrade applies it and the last recovery undoes it."""
        return f"{self.type}:{service}"

    def describe(self, ctx: ActionContext) -> str:
        return self.type

    def apply(self, ctx: ActionContext) -> str:
        raise NotImplementedError

    def undo(self, ctx: ActionContext) -> str:
        raise NotImplementedError


class EventAction(Action):
    """Only the decision event; services that switch live follow it on WatchEvents."""

    type = "event"

    def key(self, service: str) -> str:
        return ""  # nothing to share or undo

    def apply(self, ctx: ActionContext) -> str:
        return "recorded"

    def undo(self, ctx: ActionContext) -> str:
        return "recorded"


@dataclass(frozen=True)
class Attempt:
    """One try of one action, as the event log records it."""

    action: str
    operation: str  # apply / undo
    target: str
    attempt: int
    attempts: int
    ok: bool
    outcome: str
    error: str = ""
    retry_in: float = 0.0
    duration: float = 0.0


Report = Callable[[Attempt, ActionContext], None]


def run_action(
    action: Action,
    ctx: ActionContext,
    report: Report,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Apply (degrade) or undo (recover) with retries; report every attempt.
    True when an attempt succeeded."""
    op = action.apply if ctx.direction == DEGRADE else action.undo
    name = "apply" if ctx.direction == DEGRADE else "undo"
    try:
        target = action.describe(ctx)
    except Exception as exc:  # ActionError: a target it must not touch, or cannot find
        error = str(exc) if isinstance(exc, ActionError) else f"{type(exc).__name__}: {exc}"
        report(Attempt(action.type, name, "?", 1, 1, False, "failed", error), ctx)
        return False
    n = action.retry.attempts
    for i in range(1, n + 1):
        start = time.monotonic()
        try:
            outcome = op(ctx)
        except ActionError as exc:
            last = i == n or not exc.retryable
            wait = 0.0 if last else action.retry.delay(i)
            report(
                Attempt(
                    action.type,
                    name,
                    target,
                    i,
                    n,
                    False,
                    "failed" if last else "will retry",
                    str(exc),
                    wait,
                    time.monotonic() - start,
                ),
                ctx,
            )
            if last:
                return False
            sleep(wait)
            continue
        except Exception as exc:  # a bug or a bad value: an event, never past the runner
            report(
                Attempt(
                    action.type,
                    name,
                    target,
                    i,
                    n,
                    False,
                    "failed",
                    f"{type(exc).__name__}: {exc}",
                    0.0,
                    time.monotonic() - start,
                ),
                ctx,
            )
            return False
        report(
            Attempt(
                action.type, name, target, i, n, True, outcome, "", 0.0, time.monotonic() - start
            ),
            ctx,
        )
        return True
    return False


def action_types() -> dict[str, type[Action]]:
    from goleash.control.actions.alertmanager import AlertmanagerAction
    from goleash.control.actions.command import ExecAction
    from goleash.control.actions.flagfile import FileAction
    from goleash.control.actions.kubernetes import KubernetesAction
    from goleash.control.actions.webhook import WebhookAction

    return {
        "alertmanager": AlertmanagerAction,
        "event": EventAction,
        "exec": ExecAction,
        "file": FileAction,
        "kubernetes": KubernetesAction,
        "webhook": WebhookAction,
    }


COMMON_KEYS = ("type", "retries", "retry_initial_seconds", "retry_max_seconds")


def build_action(spec: Mapping[str, Any]) -> Action:
    """An Action from its policy mapping; ActionSpecError names the key at fault."""
    types = action_types()
    kind = spec.get("type")
    if kind not in types:
        raise ActionSpecError("type", f"action type must be one of {', '.join(sorted(types))}")
    cls = types[kind]
    allowed = set(COMMON_KEYS) | set(getattr(cls, "keys", ()))
    for k in spec:
        if k not in allowed:
            raise ActionSpecError(
                str(k),
                f"unknown key {k!r} for a {kind} action (known: {', '.join(sorted(allowed))})",
            )
    if "retries" in spec and (
        isinstance(spec["retries"], bool)
        or not isinstance(spec["retries"], int)
        or not 0 <= spec["retries"] <= MAX_RETRIES
    ):
        raise ActionSpecError("retries", f"retries must be a whole number from 0 to {MAX_RETRIES}")
    for k in ("retry_initial_seconds", "retry_max_seconds"):
        seconds(spec, k, 1.0, positive=False)
    action = cls(spec)
    check = getattr(action, "check", None)
    if check is not None:
        check()
    return action


MAX_RETRIES = 100
MAX_SECONDS = 3600.0  # timeouts and retry delays


def seconds(spec: Mapping[str, Any], key: str, default: float, *, positive: bool) -> float:
    """A finite number of seconds, at most an hour (> 0 when `positive`): NaN or
    infinity would wait forever, or never."""
    v = spec.get(key, default)
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or not math.isfinite(v)
        or v < 0
        or (positive and v == 0)
        or v > MAX_SECONDS
    ):
        low = "> 0" if positive else ">= 0"
        raise ActionSpecError(key, f"{key} must be a finite number of seconds {low}, at most 1h")
    return float(v)


def env_spec(spec: Mapping[str, Any]) -> dict[str, str]:
    """The `env:` mapping of an action (HTTP/2 off when not given)."""
    env = spec.get("env", HTTP2_OFF)
    if not isinstance(env, Mapping) or not env:
        raise ActionSpecError("env", "env must be a mapping of variable names to values")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not k or not isinstance(v, str | int | float):
            raise ActionSpecError("env", f"env {k!r}: names and values are strings")
        out[k] = str(v)
    return out
