"""`kubernetes`: set env on a workload's containers (a rolling restart), undo on recovery.

Go's net/http reads GODEBUG at process start, so HTTP/2 goes off by restarting the
pods with `GODEBUG=http2client=0,http2server=0`: patching the pod template does
exactly that, through the workload's own rolling update. The values a container had
before are kept in an annotation on the workload (`goleash.io/original-env`), so
recovery puts back what was there (a GODEBUG of the user's own is merged with ours
on degrade, and restored on recovery), and a second apply of the same change is a
no-op. Patches are JSON patches that carry the resourceVersion read, so a
concurrent edit makes the attempt fail with 409 Conflict (and retry on fresh data)
instead of being overwritten.

The workload comes from the action (`namespace`, `kind`, `name`, `container`), else
from what the agents learnt about the service's pods, else from a service named
"namespace/name". Agents are not trusted to say where to act: the action names the
namespaces it may patch (`namespace:` or `namespaces: [...]`, required), and what
agents report can only pick a workload inside them, never widen them.
The API server from `kubeconfig:` (and `context:`), else the pod's
service account, else the default kubeconfig.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

from goleash.control.actions import (
    Action,
    ActionContext,
    ActionError,
    ActionSpecError,
    env_spec,
)

ANNOTATION = "goleash.io/original-env"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
KINDS = {"Deployment": "deployment", "StatefulSet": "stateful_set", "DaemonSet": "daemon_set"}
_MISSING = None  # the variable was not set before


def merge_godebug(current: str, ours: str) -> str:
    """GODEBUG is a comma list of key=value: ours override the same keys, others stay."""
    keep = [kv for kv in current.split(",") if kv.strip()]
    mine = [kv for kv in ours.split(",") if kv.strip()]
    names = {kv.split("=", 1)[0].strip() for kv in mine}
    return ",".join([kv for kv in keep if kv.split("=", 1)[0].strip() not in names] + mine)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")  # JSON pointer (RFC 6901)


class KubernetesAction(Action):
    type = "kubernetes"
    keys = (
        "env",
        "namespace",
        "namespaces",
        "kind",
        "name",
        "container",
        "kubeconfig",
        "context",
    )

    def check(self) -> None:
        env_spec(self.spec)
        kind = self.spec.get("kind", "Deployment")
        if kind not in KINDS:
            raise ActionSpecError("kind", f"kind must be one of {', '.join(KINDS)}")
        for k in ("namespace", "name", "container", "kubeconfig", "context"):
            if k in self.spec and (not isinstance(self.spec[k], str) or not self.spec[k]):
                raise ActionSpecError(k, f"{k} must be a non-empty string")
        allowed = self.spec.get("namespaces")
        if allowed is not None and (
            not isinstance(allowed, list)
            or not allowed
            or not all(isinstance(n, str) and _DNS_LABEL.fullmatch(n) for n in allowed)
        ):
            raise ActionSpecError("namespaces", "namespaces is a list of namespace names")
        if not self.allowed_namespaces():
            raise ActionSpecError(
                "namespaces",
                "a kubernetes action needs namespace: or namespaces: [...] (where it may "
                "act; agents' reports cannot choose the namespace)",
            )
        ns = self.spec.get("namespace")
        if ns is not None and allowed is not None and ns not in allowed:
            raise ActionSpecError("namespace", f"namespace {ns!r} is not in namespaces:")

    def allowed_namespaces(self) -> frozenset[str]:
        if self.spec.get("namespace"):
            return frozenset({self.spec["namespace"]})
        return frozenset(self.spec.get("namespaces") or ())

    def target(self, ctx: ActionContext) -> tuple[str, str, str]:
        """(kind, namespace, name) of the workload to patch."""
        allowed = self.allowed_namespaces()
        k8s = ctx.kubernetes
        svc_ns, _, svc_name = ctx.service.partition("/") if "/" in ctx.service else ("", "", "")
        # the namespace: the policy's own when it names one; else the agents' (or the
        # service name's) when the policy allows it
        ns = self.spec.get("namespace") or k8s.get("namespace") or svc_ns
        if ns not in allowed:
            raise ActionError(
                f"service {ctx.service[:80]!r} is in namespace {ns[:80]!r}, which this "
                f"action may not touch (namespaces: {', '.join(sorted(allowed))})",
                retryable=False,
            )
        # what agents saw is only about the namespace they saw it in
        seen = k8s if k8s.get("namespace") == ns else {}
        kind = self.spec.get("kind") or seen.get("workload_kind") or "Deployment"
        name = self.spec.get("name") or seen.get("workload_name") or ""
        if not name and svc_ns == ns:
            name = svc_name
        if not (ns and name):
            raise ActionError(
                f"no Kubernetes workload known for service {ctx.service!r}: the agents saw no "
                "pod for it; give namespace: and name: in the action",
                retryable=False,
            )
        if kind not in KINDS:
            raise ActionError(f"cannot patch a {kind} (only {', '.join(KINDS)})", retryable=False)
        return kind, ns, name

    def key(self, service: str) -> str:
        return f"kubernetes:{service}:{json.dumps(sorted(env_spec(self.spec).items()))}"

    def describe(self, ctx: ActionContext) -> str:
        kind, ns, name = self.target(ctx)
        return f"{kind} {ns}/{name}"

    def _api(self) -> Any:
        from kubernetes import client, config

        try:
            if self.spec.get("kubeconfig"):
                api = config.new_client_from_config(
                    config_file=self.spec["kubeconfig"], context=self.spec.get("context")
                )
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
                api = client.ApiClient()
            else:
                api = config.new_client_from_config(context=self.spec.get("context"))
        except config.ConfigException as exc:
            raise ActionError(f"no Kubernetes API to talk to: {exc}", retryable=False) from exc
        return client.AppsV1Api(api)

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from kubernetes.client import ApiException

        try:
            resp = fn(_preload_content=False, _request_timeout=10, **kw)
            return json.loads(resp.data)
        except ApiException as exc:
            reason = exc.reason
            with contextlib.suppress(ValueError):
                reason = json.loads(exc.body or "{}").get("message") or reason
            # 403/404/422 will not change by trying again; conflicts and 5xx may
            retry = exc.status in (409, 429) or (exc.status or 0) >= 500
            raise ActionError(f"{what}: {exc.status} {reason}", retryable=retry) from exc
        except OSError as exc:  # connection refused, timeouts (urllib3 errors are OSErrors)
            raise ActionError(f"{what}: {exc}") from exc
        except Exception as exc:  # urllib3's MaxRetryError and friends
            if type(exc).__module__.startswith("urllib3"):
                raise ActionError(f"{what}: {exc}") from exc
            raise

    def _patch(self, ctx: ActionContext, degrade: bool) -> str:
        """Degrade (or restore) the workload's containers' environment with one JSON
        patch, conditional on the resourceVersion read; the original values are kept
        in an annotation so the undo puts back exactly what was there."""
        kind, ns, name = self.target(ctx)
        api = self._api()
        suffix = KINDS[kind]
        read = getattr(api, f"read_namespaced_{suffix}")
        patch = getattr(api, f"patch_namespaced_{suffix}")
        where = f"{kind} {ns}/{name}"
        obj = self._call(f"read {where}", read, name=name, namespace=ns)
        meta = obj.get("metadata", {})
        annotations = meta.get("annotations") or {}
        containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        seen = ctx.kubernetes if ctx.kubernetes.get("namespace") == ns else {}
        only = self.spec.get("container") or seen.get("container") or ""
        if only and not any(c.get("name") == only for c in containers):
            raise ActionError(f"{where} has no container {only!r}", retryable=False)
        saved: dict[str, dict[str, Any]] = json.loads(annotations.get(ANNOTATION, "{}"))
        want = env_spec(self.spec)
        # resourceVersion in a patch is a precondition: the API server answers 409
        # Conflict if the workload changed since it was read (then we read again)
        ops: list[dict[str, Any]] = [
            {
                "op": "replace",
                "path": "/metadata/resourceVersion",
                "value": meta.get("resourceVersion"),
            }
        ]
        env_ops, changed, new_saved = _container_env_ops(containers, only, saved, want, degrade)
        ops += env_ops + _annotation_ops(meta, saved, new_saved)
        if len(ops) == 1:
            return f"{where} already {'degraded' if degrade else 'restored'}"
        self._call(
            f"patch {where}",
            patch,
            name=name,
            namespace=ns,
            body=ops,
            field_manager="goleash",
            _content_type="application/json-patch+json",
        )
        what = ", ".join(f"{k}={v}" for k, v in want.items())
        if degrade:
            return (
                f"{where}: set {what} on {', '.join(changed) or 'no container'} (rolling restart)"
            )
        return (
            f"{where}: restored the env of {', '.join(changed) or 'no container'} (rolling restart)"
        )

    def apply(self, ctx: ActionContext) -> str:
        return self._patch(ctx, degrade=True)

    def undo(self, ctx: ActionContext) -> str:
        return self._patch(ctx, degrade=False)


def _container_env_ops(
    containers: list[dict[str, Any]],
    only: str,
    saved: dict[str, dict[str, Any]],
    want: dict[str, str],
    degrade: bool,
) -> tuple[list[dict[str, Any]], list[str], dict[str, dict[str, Any]]]:
    """The patch operations that set (or restore) each container's env; the names of
    the containers changed; what the annotation should remember afterwards."""
    ops: list[dict[str, Any]] = []
    changed = []
    new_saved = dict(saved)
    for i, c in enumerate(containers):
        cname = c.get("name", "")
        if only and cname != only:
            continue
        env = [dict(e) for e in c.get("env") or []]
        if degrade:
            # first degrade: remember what was there (a copy: env is edited below)
            by_name = {e.get("name"): e for e in env}
            before = saved.get(cname) or {
                k: dict(by_name[k]) if k in by_name else _MISSING for k in want
            }
            new_saved[cname] = before
            env = _degraded_env(env, by_name, before, want)
        else:
            if cname not in saved:
                continue  # nothing of ours here
            env = _restored_env(env, saved[cname])
            new_saved.pop(cname, None)
        if env != (c.get("env") or []):
            changed.append(cname)
            ops.append(
                {"op": "add", "path": f"/spec/template/spec/containers/{i}/env", "value": env}
            )
    return ops, changed, new_saved


def _degraded_env(
    env: list[dict[str, Any]],
    by_name: dict[Any, dict[str, Any]],
    before: dict[str, Any],
    want: dict[str, str],
) -> list[dict[str, Any]]:
    """env (edited in place through by_name) with the wanted variables set; GODEBUG is
    merged into the value it had before the first degrade."""
    for k, v in want.items():
        orig = before.get(k)
        base = orig.get("value", "") if isinstance(orig, dict) else ""
        value = merge_godebug(base, v) if k == "GODEBUG" else v
        if k in by_name:
            by_name[k].pop("valueFrom", None)
            by_name[k]["value"] = value
        else:
            env.append({"name": k, "value": value})
    return env


def _restored_env(env: list[dict[str, Any]], before: dict[str, Any]) -> list[dict[str, Any]]:
    """env with each variable goleash set put back as it was (or removed if it was not)."""
    for k, orig in before.items():
        env = [e for e in env if e.get("name") != k]
        if isinstance(orig, dict):
            env.append(orig)
    return env


def _annotation_ops(
    meta: dict[str, Any], saved: dict[str, dict[str, Any]], new_saved: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The patch operations that keep the annotation of saved originals current."""
    if new_saved == saved:
        return []
    path = f"/metadata/annotations/{_escape(ANNOTATION)}"
    if not new_saved:
        return [{"op": "remove", "path": path}]
    ops: list[dict[str, Any]] = []
    if "annotations" not in meta or meta["annotations"] is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": path, "value": json.dumps(new_saved, sort_keys=True)})
    return ops
