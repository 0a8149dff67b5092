"""The words and details of the events the policy engine writes for a decision and
for each attempt of its actions (what the event log, alerts and tests read)."""

from __future__ import annotations

from typing import Any

from goleash.control.actions import DEGRADE, Action, ActionContext, Attempt


def decision_record(
    ctx: ActionContext, forced: bool, planned: list[str], jobs: list[tuple[Action, str]]
) -> tuple[str, dict[str, Any]]:
    """The DECISION event of a level change: its message and details."""
    up = ctx.direction == DEGRADE
    enforce = ctx.mode == "enforce"
    verb = "degrade" if up else "recover"
    prefix = "" if enforce else "monitor: would "
    msg = (
        f"{ctx.service}: {prefix}{verb} {ctx.from_level or 'normal'} -> "
        f"{ctx.to_level or 'normal'} ({ctx.rule}: {ctx.reason})"
    )
    return msg, {
        "decision": ctx.direction,
        "rule": ctx.rule,
        "from_level": ctx.from_level,
        "to_level": ctx.to_level,
        "mode": ctx.mode,
        "dry_run": not enforce,
        "applied": enforce,
        "forced": forced,
        "reason": ctx.reason,
        "actions": planned,
        "http2": "off" if up and any(a.type != "event" for a, _ in jobs) else "",
        "evidence": ctx.evidence,
    }


def attempt_record(a: Attempt, ctx: ActionContext) -> tuple[str, dict[str, Any]]:
    """The ACTION event of one attempt of an action: its message and details."""
    ok = "ok" if a.ok else a.outcome
    msg = (
        f"{ctx.service}: {a.action} {a.operation} {a.target} "
        f"(attempt {a.attempt}/{a.attempts}, {ctx.direction} {ctx.rule}): "
        f"{a.outcome if a.ok else ok + ': ' + a.error}"
    )
    details = {
        "decision_id": ctx.decision_id,
        "decision": ctx.direction,
        "rule": ctx.rule,
        "level": ctx.level,
        "action": a.action,
        "operation": a.operation,
        "target": a.target,
        "attempt": a.attempt,
        "attempts": a.attempts,
        "ok": a.ok,
        "outcome": a.outcome,
        "error": a.error,
        "retry_in_seconds": a.retry_in,
        "duration_seconds": a.duration,
        "evidence": ctx.evidence,
    }
    return msg, details
