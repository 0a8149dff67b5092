"""`webhook`: POST the decision in Alertmanager's webhook shape (version "4").

Anything that receives Alertmanager notifications (chat bridges, incident tools,
a receiver of your own) can take it: `status` is "firing" on degrade and
"resolved" on recovery, with the same fingerprint, so receivers pair them. The
evidence rides in annotations: a summary, the evidence as JSON, the latency
histogram as text, and links (URLs when the control plane has an external URL,
else paths on its host) to the flame graph of the offending goroutines' creation
stacks as SVG, folded stacks and a pprof profile. Prefer the `alertmanager` action,
which goes through Alertmanager's routing, grouping and silences.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from goleash import __version__
from goleash.control.actions import (
    DEGRADE,
    Action,
    ActionContext,
    ActionError,
    ActionSpecError,
    seconds,
)
from goleash.control.actions.evidence import evidence_links, generator_url

DEFAULT_TIMEOUT = 10.0
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not ended"


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alert_labels(ctx: ActionContext) -> dict[str, str]:
    return {
        "alertname": "GoleashDegraded",
        "service": ctx.service,
        "rule": ctx.rule,
        "severity": {"L1": "info", "L2": "warning"}.get(ctx.level, "critical"),
        "source": "goleash",
    }


def alertmanager_payload(ctx: ActionContext, receiver: str = "goleash") -> dict[str, Any]:
    """The Alertmanager v4 webhook body for a decision."""
    firing = ctx.direction == DEGRADE
    labels = alert_labels(ctx)
    fingerprint = hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]
    ev = ctx.evidence
    links = evidence_links(ev)
    annotations = {
        "summary": (
            f"{ctx.service}: {ctx.direction} {ctx.from_level or 'normal'} -> "
            f"{ctx.to_level or 'normal'} ({ctx.rule})"
        ),
        "description": ctx.reason,
        "decision_id": str(ctx.decision_id),
        "evidence": json.dumps(
            {k: v for k, v in ev.items() if k != "latency_histogram_text"}, default=str
        ),
        "latency_histogram": str(ev.get("latency_histogram_text", "")),
        **links,
    }
    alert = {
        "status": "firing" if firing else "resolved",
        "labels": labels,
        "annotations": annotations,
        "startsAt": _rfc3339(ctx.time if firing else ctx.degraded_since),
        "endsAt": ZERO_TIME if firing else _rfc3339(ctx.time),
        "generatorURL": generator_url(ev),
        "fingerprint": fingerprint,
    }
    group = {"alertname": labels["alertname"], "service": ctx.service}
    return {
        "version": "4",
        "groupKey": "{}:" + "{" + ",".join(f'{k}="{v}"' for k, v in group.items()) + "}",
        "truncatedAlerts": 0,
        "status": alert["status"],
        "receiver": receiver,
        "groupLabels": group,
        "commonLabels": labels,
        "commonAnnotations": {k: annotations[k] for k in ("summary", "description")},
        "externalURL": "",
        "alerts": [alert],
    }


class WebhookAction(Action):
    type = "webhook"
    keys = ("url", "timeout_seconds", "headers", "receiver")

    def check(self) -> None:
        url = self.spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ActionSpecError("url", "a webhook action needs url: http(s)://...")
        seconds(self.spec, "timeout_seconds", DEFAULT_TIMEOUT, positive=True)
        headers = self.spec.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ActionSpecError("headers", "headers must map names to strings")

    def key(self, service: str) -> str:
        return f"webhook:{self.spec['url']}:{service}"

    def describe(self, ctx: ActionContext) -> str:
        return f"POST {self.spec['url']}"

    def _post(self, ctx: ActionContext) -> str:
        url = str(self.spec["url"])
        body = alertmanager_payload(ctx, str(self.spec.get("receiver", "goleash")))
        headers = dict(self.spec.get("headers", {}))
        return post_json(
            url, body, headers, float(self.spec.get("timeout_seconds", DEFAULT_TIMEOUT))
        )

    def apply(self, ctx: ActionContext) -> str:
        return self._post(ctx)

    def undo(self, ctx: ActionContext) -> str:
        return self._post(ctx)


def post_json(url: str, body: Any, headers: dict[str, str], timeout: float) -> str:
    """POST `body` as JSON; what the receiver answered, or an ActionError saying whether
    a retry may help (4xx other than 408/429 will not change on retry; 5xx may)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("User-Agent", f"goleash/{__version__}")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return f"{url} answered {resp.status}"
    except urllib.error.HTTPError as exc:
        retry = exc.code >= 500 or exc.code in (408, 429)
        # the receiver's reason (Alertmanager says why it rejects a body), cut short
        detail = exc.read(300).decode("utf-8", "replace").strip()
        raise ActionError(
            f"{url} answered {exc.code} {exc.reason}" + (f": {detail}" if detail else ""),
            retryable=retry,
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ActionError(f"{url}: {reason}") from exc
