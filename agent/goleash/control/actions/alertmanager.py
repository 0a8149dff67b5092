"""`alertmanager`: post the decision to Alertmanager's API (`POST /api/v2/alerts`).

Unlike `webhook` (which speaks to notification receivers directly), this goes
through Alertmanager, so its routing, grouping, inhibition and silences apply, as
they do to Prometheus' alerts. What it sends (the v2 `postableAlerts` schema):

- labels, the alert's identity: `alertname` (GoleashDegraded by default),
  `service`, `rule`, `severity` (L1 info, L2 warning, L3 and above critical),
  `source="goleash"`, plus the action's `labels:`;
- annotations: summary, description, the level, the decision id, the measured
  value, the latency histogram, and links to the evidence (flame graph SVG, folded
  stacks, pprof profile), plus the action's `annotations:`;
- `startsAt`; `endsAt` = startsAt + `hold_seconds` while degraded (so an alert
  whose recovery never comes, say the control plane is gone, expires on its own
  rather than fire forever), the recovery time once it recovers (resolved);
- `generatorURL`: the decision's flame graph as the control plane serves it
  (`control-plane --external-url`), else the control plane's external URL.

A degrade to a level also resolves the alerts of the other severities of the same
service and rule, so an escalation L1 -> L3 leaves one firing alert, and a
recovery resolves them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from goleash.control.actions import DEGRADE, Action, ActionContext, ActionSpecError
from goleash.control.actions.evidence import evidence_links, generator_url
from goleash.control.actions.webhook import post_json

DEFAULT_TIMEOUT = 10.0
DEFAULT_HOLD = 86_400.0
SEVERITIES = ("info", "warning", "critical")
API_PATH = "/api/v2/alerts"
MAX_REMEMBERED = 4096
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
OWN_LABELS = ("alertname", "service", "rule", "severity", "source")


def severity(level: str) -> str:
    return {"L1": "info", "L2": "warning"}.get(level, "critical")


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _str_map(spec: Mapping[str, Any], key: str, *, label_names: bool) -> dict[str, str]:
    value = spec.get(key, {})
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ActionSpecError(key, f"{key} must map names to strings")
    if label_names:
        bad = [k for k in value if not LABEL_NAME.fullmatch(k) or k.startswith("__")]
        if bad:
            raise ActionSpecError(key, f"{key}: {bad[0]!r} is not a valid label name")
        clash = [k for k in value if k in OWN_LABELS[1:]]
        if clash:
            raise ActionSpecError(key, f"{key}: {clash[0]!r} is set by goleash")
    return dict(value)


class AlertmanagerAction(Action):
    type = "alertmanager"
    keys = ("url", "timeout_seconds", "headers", "labels", "annotations", "hold_seconds")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self._generator: dict[str, str] = {}  # service -> generatorURL of its degrade

    def check(self) -> None:
        url = self.spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ActionSpecError(
                "url", "an alertmanager action needs url: http(s)://HOST:9093 (its base URL)"
            )
        for key, default in (("timeout_seconds", DEFAULT_TIMEOUT), ("hold_seconds", DEFAULT_HOLD)):
            v = self.spec.get(key, default)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < 1e9:
                raise ActionSpecError(key, f"{key} must be a number > 0")
        _str_map(self.spec, "headers", label_names=False)
        _str_map(self.spec, "labels", label_names=True)
        _str_map(self.spec, "annotations", label_names=False)

    @property
    def endpoint(self) -> str:
        base = str(self.spec["url"]).rstrip("/")
        return base if base.endswith(API_PATH) else base + API_PATH

    def key(self, service: str) -> str:
        return f"alertmanager:{self.spec['url']}:{service}"

    def describe(self, ctx: ActionContext) -> str:
        return f"POST {self.endpoint}"

    def alerts(self, ctx: ActionContext) -> list[dict[str, Any]]:
        """The postableAlerts body for a decision."""
        firing = ctx.direction == DEGRADE
        extra = _str_map(self.spec, "labels", label_names=False)
        base = {
            "alertname": extra.pop("alertname", "GoleashDegraded"),
            "service": ctx.service,
            "rule": ctx.rule,
            "source": "goleash",
            **extra,
        }
        ev = ctx.evidence
        annotations = {
            "summary": (
                f"{ctx.service}: {ctx.direction} {ctx.from_level or 'normal'} -> "
                f"{ctx.to_level or 'normal'} ({ctx.rule})"
            ),
            "description": ctx.reason,
            "level": ctx.level,
            "decision_id": str(ctx.decision_id),
            **{k: str(ev[k]) for k in ("signal", "value", "goroutines") if k in ev},
            **evidence_links(ev),
            **_str_map(self.spec, "annotations", label_names=False),
        }
        if ev.get("latency_histogram_text"):
            annotations["latency_histogram"] = str(ev["latency_histogram_text"])
        # a recovery has no flame graph of its own: its alert keeps pointing at the one
        # that explained the degrade (while this control plane remembers it)
        if firing:
            url = generator_url(ev)
            self._generator.pop(ctx.service, None)
            self._generator[ctx.service] = url
            while len(self._generator) > MAX_REMEMBERED:  # services come from agents: capped
                self._generator.pop(next(iter(self._generator)))
        else:
            url = self._generator.get(ctx.service) or generator_url(ev)
        now = _rfc3339(ctx.time)
        hold = float(self.spec.get("hold_seconds", DEFAULT_HOLD))
        out = []
        current = severity(ctx.level)
        for sev in SEVERITIES:
            alert: dict[str, Any] = {"labels": {**base, "severity": sev}}
            if firing and sev == current:
                alert["annotations"] = annotations
                alert["startsAt"] = now
                alert["endsAt"] = _rfc3339(ctx.time + hold)
            else:
                # resolved: recovered, or replaced by the severity now firing
                alert["annotations"] = annotations
                alert["startsAt"] = _rfc3339(ctx.degraded_since if not firing else ctx.time)
                alert["endsAt"] = now
            if url:
                alert["generatorURL"] = url
            out.append(alert)
        return out

    def _post(self, ctx: ActionContext) -> str:
        headers = _str_map(self.spec, "headers", label_names=False)
        timeout = float(self.spec.get("timeout_seconds", DEFAULT_TIMEOUT))
        return post_json(self.endpoint, self.alerts(ctx), headers, timeout)

    def apply(self, ctx: ActionContext) -> str:
        return self._post(ctx)

    def undo(self, ctx: ActionContext) -> str:
        return self._post(ctx)
