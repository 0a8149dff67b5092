"""GetPolicy, SetPolicy and OverrideService: the policy store through the API.

Secrets are redacted for non-admins, and every change is an event naming who made it."""

from __future__ import annotations

from collections.abc import Container
from typing import Any, cast

import grpc

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import auth
from goleash.control.events import EventLog
from goleash.control.limits import InvalidArgument, NotFound
from goleash.control.policy import (
    PolicyError,
    PolicyStore,
    accept_policy,
    check_override,
    compile_policy,
)


def get_policy(policies: PolicyStore, *, admin: bool) -> q.GetPolicyResponse:
    out = q.GetPolicyResponse()
    cur = policies.current
    if cur is not None:
        text = cur.document.text
        out.policy_yaml = text if admin else auth.redact_policy(text)
        out.version = cur.version
        out.set_unix_nano = int(cur.set_at * 1e9)
        out.source = cur.source
        out.mode = _mode(cur.document.mode)
    for o in policies.active_overrides():
        out.overrides.append(override_message(o))
    return out


async def set_policy(
    policies: PolicyStore,
    events: EventLog,
    request: q.SetPolicyRequest,
    context: grpc.aio.ServicerContext,
) -> q.SetPolicyResponse:
    """Validate (and unless validate_only, install) a policy; a rejected one aborts
    with the offending line and reason in the trailing metadata."""
    who = auth.current().name
    running = policies.current.version if policies.current else 0
    try:
        if request.validate_only:
            doc, _ = compile_policy(request.policy_yaml)
            return q.SetPolicyResponse(version=running, mode=_mode(doc.mode), rules=len(doc.rules))
        accepted = accept_policy(policies, events, request.policy_yaml, "api", identity=who)
    except PolicyError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"policy rejected: {exc} (the running policy, version {running}, is unchanged)",
            trailing_metadata=(
                ("goleash-policy-line", str(exc.line)),
                ("goleash-policy-reason", exc.reason.encode("ascii", "replace").decode()),
            ),
        )
        raise  # unreachable
    doc = accepted.document
    return q.SetPolicyResponse(version=accepted.version, mode=_mode(doc.mode), rules=len(doc.rules))


def override(
    policies: PolicyStore,
    events: EventLog,
    services: Container[str],
    r: q.OverrideServiceRequest,
    who: str,
) -> q.OverrideServiceResponse:
    """Apply one override (or clear them) for a service this control plane has seen."""
    _check_override_request(r, services)
    out = q.OverrideServiceResponse()
    if r.action == q.OVERRIDE_ACTION_CLEAR:
        out.cleared = policies.clear_overrides(r.service)
    else:
        if r.action == q.OVERRIDE_ACTION_PAUSE_RULE:
            _check_rule_exists(policies, r.rule)
            out.cleared = policies.clear_overrides(r.service, action=r.action, rule=r.rule)
        else:  # degrade and recover replace each other
            for a in (q.OVERRIDE_ACTION_FORCE_DEGRADE, q.OVERRIDE_ACTION_FORCE_RECOVER):
                out.cleared += policies.clear_overrides(r.service, action=a)
        o = policies.add_override(
            r.service, r.action, r.rule, r.level, r.reason, r.duration_seconds
        )
        out.override.CopyFrom(override_message(o))
    _log_override(events, r, who, out.cleared)
    return out


def _check_override_request(r: q.OverrideServiceRequest, services: Container[str]) -> None:
    if not r.service:
        raise InvalidArgument("service is required")
    if r.action not in q.OverrideAction.values() or r.action == 0:
        raise InvalidArgument("action must be PAUSE_RULE, FORCE_DEGRADE, FORCE_RECOVER or CLEAR")
    if r.service not in services:
        raise NotFound(f"no service named {r.service!r} has been seen by this control plane")
    check_override(r.rule, r.level, r.reason, r.duration_seconds)


def _check_rule_exists(policies: PolicyStore, rule: str) -> None:
    if not rule:
        raise InvalidArgument("PAUSE_RULE needs rule (the rule's name)")
    cur = policies.current
    names = [r["name"] for r in cur.document.rules] if cur else []
    if rule not in names:
        raise NotFound(
            f"the running policy has no rule {rule!r} (rules: {', '.join(names) or 'none'})"
        )


def _log_override(events: EventLog, r: q.OverrideServiceRequest, who: str, cleared: int) -> None:
    action = q.OverrideAction.Name(r.action).removeprefix("OVERRIDE_ACTION_")
    events.append(
        t.EVENT_KIND_OVERRIDE,
        f"{r.service}: override {action.lower()}"
        + (f" {r.rule}" if r.rule else "")
        + (f" {r.level}" if r.level else "")
        + (f" for {r.duration_seconds:g}s" if r.duration_seconds else "")
        + (f" ({r.reason})" if r.reason else "")
        + f" by {who}",
        service=r.service,
        details={
            "identity": who,
            "action": action,
            "rule": r.rule,
            "level": r.level,
            "duration_seconds": r.duration_seconds,
            "reason": r.reason,
            "cleared": cleared,
        },
    )


def _mode(mode: str) -> q.PolicyMode:
    return cast(q.PolicyMode, q.PolicyMode.Value("POLICY_MODE_" + mode.upper()))


def override_message(o: Any) -> q.Override:
    return q.Override(
        id=o.id,
        service=o.service,
        action=o.action,
        rule=o.rule,
        level=o.level,
        reason=o.reason,
        created_unix_nano=int(o.created * 1e9),
        expires_unix_nano=int(o.expires * 1e9),
    )
