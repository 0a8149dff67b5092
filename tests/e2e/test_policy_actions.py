"""The policy engine's actions against real services over real sockets: a fake
Kubernetes API server (apps/v1 GET and JSON PATCH over HTTP, driven by the official
client), an Alertmanager-style webhook receiver (up, and down), a command, a flag
file. Decisions come from the engine fed like the control plane is."""

from __future__ import annotations

import copy
import json
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engineworld import World
from goleash.control.actions import DEGRADE, RECOVER, ActionContext, Attempt, run_action
from goleash.control.actions.kubernetes import ANNOTATION, KubernetesAction

HTTP2_OFF = "http2client=0,http2server=0"


# --- a fake Kubernetes API server ----------------------------------------------------------


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/replace/remove/test, enough for what an API server would apply."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key: Any = int(last) if isinstance(node, list) else last
        if op["op"] in ("add", "replace"):
            if op["op"] == "replace" and (key not in node if isinstance(node, dict) else False):
                raise KeyError(op["path"])
            node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        elif op["op"] == "test" and node[key] != op["value"]:
            raise ValueError(f"test of {op['path']} failed")
    return doc


class FakeKube:
    """apps/v1 Deployments in memory, served over HTTP like an API server does."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.forbidden: set[str] = set()
        self.patches: list[list[dict[str, Any]]] = []
        self.conflicts_to_inject = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "status": "Failure",
                        "reason": reason,
                        "message": message,
                        "code": code,
                    },
                )

            def _target(self) -> tuple[str, str] | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                # apis/apps/v1/namespaces/NS/deployments/NAME
                if (
                    len(parts) == 7
                    and parts[:3] == ["apis", "apps", "v1"]
                    and parts[5] == "deployments"
                ):
                    return parts[4], parts[6]
                return None

            def do_GET(self) -> None:
                key = self._target()
                if key is None or key not in fake.objects:
                    return self._status(404, "NotFound", f"{self.path} not found")
                if key[0] in fake.forbidden:
                    return self._forbidden(key)
                with fake.lock:
                    self._send(200, fake.objects[key])

            def _forbidden(self, key: tuple[str, str]) -> None:
                self._status(
                    403,
                    "Forbidden",
                    f'deployments.apps "{key[1]}" is forbidden: User '
                    f'"system:serviceaccount:goleash:goleash" cannot get resource in '
                    f'namespace "{key[0]}"',
                )

            def do_PATCH(self) -> None:
                key = self._target()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if key is None or key not in fake.objects:
                    return self._status(404, "NotFound", "not found")
                if key[0] in fake.forbidden:
                    return self._forbidden(key)
                if self.headers["Content-Type"] != "application/json-patch+json":
                    return self._status(415, "UnsupportedMediaType", self.headers["Content-Type"])
                with fake.lock:
                    cur = fake.objects[key]
                    if fake.conflicts_to_inject:
                        # someone else edited it between our GET and PATCH
                        fake.conflicts_to_inject -= 1
                        cur["metadata"]["resourceVersion"] = str(
                            int(cur["metadata"]["resourceVersion"]) + 1
                        )
                    try:
                        new = json_patch(cur, body)
                    except (KeyError, IndexError, ValueError) as exc:
                        return self._status(422, "Invalid", str(exc))
                    if new["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"]:
                        return self._status(
                            409,
                            "Conflict",
                            "Operation cannot be fulfilled on deployments.apps: the object has "
                            "been modified; please apply your changes to the latest version",
                        )
                    fake.patches.append(body)
                    new["metadata"]["resourceVersion"] = str(
                        int(cur["metadata"]["resourceVersion"]) + 1
                    )
                    if new["spec"]["template"] != cur["spec"]["template"]:
                        new["metadata"]["generation"] = cur["metadata"].get("generation", 1) + 1
                    fake.objects[key] = new
                    self._send(200, new)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def deployment(self, ns: str, name: str, containers: dict[str, dict[str, str]]) -> None:
        self.objects[(ns, name)] = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "100", "generation": 1},
            "spec": {
                "replicas": 2,
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "containers": [
                            {
                                "name": c,
                                "image": f"example/{c}:1",
                                **(
                                    {"env": [{"name": k, "value": v} for k, v in env.items()]}
                                    if env
                                    else {}
                                ),
                            }
                            for c, env in containers.items()
                        ]
                    },
                },
            },
        }

    def env(self, ns: str, name: str, container: str) -> dict[str, str]:
        for c in self.objects[(ns, name)]["spec"]["template"]["spec"]["containers"]:
            if c["name"] == container:
                return {e["name"]: e.get("value", "") for e in c.get("env", [])}
        raise KeyError(container)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeKube, Path]]:
    fake = FakeKube()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "goleash", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "goleash"}}],
                "current-context": "fake",
            }
        )
    )
    yield fake, kubeconfig
    fake.close()


def ctx(direction: str, service: str = "shop/checkout", **kw: Any) -> ActionContext:
    return ActionContext(
        decision_id=1,
        direction=direction,
        service=service,
        rule="r",
        level="L3",
        from_level="" if direction == DEGRADE else "L3",
        to_level="L3" if direction == DEGRADE else "",
        reason="test",
        mode="enforce",
        time=1000.0,
        degraded_since=900.0,
        **kw,
    )


def run(action: Any, c: ActionContext) -> list[Attempt]:
    seen: list[Attempt] = []
    run_action(action, c, lambda a, _c: seen.append(a), sleep=lambda s: None)
    return seen


def test_kubernetes_sets_godebug_restores_it_and_is_idempotent(
    kube: tuple[FakeKube, Path],
) -> None:
    fake, kubeconfig = kube
    fake.deployment(
        "shop", "checkout", {"app": {"GODEBUG": "madvdontneed=1", "X": "1"}, "sidecar": {}}
    )
    act = KubernetesAction(
        {"type": "kubernetes", "kubeconfig": str(kubeconfig), "namespaces": ["shop", "locked"]}
    )
    (a,) = run(act, ctx(DEGRADE))
    assert a.ok and "rolling restart" in a.outcome and a.target == "Deployment shop/checkout"
    # the user's own GODEBUG setting is kept, ours added; every container gets it
    assert fake.env("shop", "checkout", "app") == {
        "GODEBUG": f"madvdontneed=1,{HTTP2_OFF}",
        "X": "1",
    }
    assert fake.env("shop", "checkout", "sidecar") == {"GODEBUG": HTTP2_OFF}
    dep = fake.objects[("shop", "checkout")]
    assert dep["metadata"]["generation"] == 2  # the pod template changed: a rollout
    assert ANNOTATION in dep["metadata"]["annotations"]
    # again: nothing to patch
    (a,) = run(act, ctx(DEGRADE))
    assert a.ok and "already degraded" in a.outcome and len(fake.patches) == 1
    (a,) = run(act, ctx(RECOVER))
    assert a.ok
    assert fake.env("shop", "checkout", "app") == {"GODEBUG": "madvdontneed=1", "X": "1"}
    assert fake.env("shop", "checkout", "sidecar") == {}
    assert ANNOTATION not in fake.objects[("shop", "checkout")]["metadata"]["annotations"]
    (a,) = run(act, ctx(RECOVER))
    assert "already restored" in a.outcome and len(fake.patches) == 2


def test_kubernetes_conflict_is_retried_and_forbidden_is_not(
    kube: tuple[FakeKube, Path],
) -> None:
    fake, kubeconfig = kube
    fake.deployment("shop", "checkout", {"app": {}})
    fake.conflicts_to_inject = 1
    act = KubernetesAction(
        {"type": "kubernetes", "kubeconfig": str(kubeconfig), "namespaces": ["shop", "locked"]}
    )
    first, second = run(act, ctx(DEGRADE))
    assert not first.ok and "409" in first.error and first.outcome == "will retry"
    assert second.ok and fake.env("shop", "checkout", "app") == {"GODEBUG": HTTP2_OFF}
    fake.deployment("locked", "api", {"app": {}})
    fake.forbidden.add("locked")
    (a,) = run(act, ctx(DEGRADE, service="locked/api"))
    assert not a.ok and "403" in a.error and "forbidden" in a.error and a.outcome == "failed"


def test_the_engine_patches_the_workload_the_agents_saw(
    kube: tuple[FakeKube, Path], tmp_path: Path
) -> None:
    fake, kubeconfig = kube
    fake.deployment("shop", "checkout", {"app": {}})
    w = World(report_dir=str(tmp_path / "reports"))
    w.kubernetes["checkout"] = {
        "namespace": "shop",
        "workload_kind": "Deployment",
        "workload_name": "checkout",
        "container": "app",
    }
    w.policy(
        f"""
        mode: enforce
        rules:
          - name: g
            signal: {{kind: goroutines, above: 100}}
            levels:
              - level: L3
                actions: [{{type: kubernetes, namespaces: [shop], kubeconfig: "{kubeconfig}"}}]
            cooldown: {{initial: 1s}}
        """
    )
    w.step({"checkout": 500})
    assert fake.env("shop", "checkout", "app") == {"GODEBUG": HTTP2_OFF}
    w.step({"checkout": 5}, dt=2)
    assert fake.env("shop", "checkout", "app") == {}
    assert [(a["operation"], a["ok"]) for a in w.actions()] == [("apply", True), ("undo", True)]
    assert w.actions()[0]["evidence"]["goroutines"] == 500  # every attempt carries evidence


class Receiver:
    """An Alertmanager webhook receiver: records what it is POSTed."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                n = int(self.headers["Content-Length"])
                rec.posts.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook_policy(url: str) -> str:
    return f"""
    mode: enforce
    rules:
      - name: readframe
        signal: {{kind: function_latency, function: main.read, window: 10s, above: 100ms}}
        levels:
          - level: L3
            actions: [{{type: webhook, url: "{url}", retries: 3, retry_initial_seconds: 0.5}}]
        cooldown: {{initial: 1s}}
    """


def test_webhook_posts_alertmanager_v4_with_flame_graph_and_histogram(tmp_path: Path) -> None:
    rec = Receiver()
    try:
        w = World(report_dir=str(tmp_path))
        w.policy(webhook_policy(rec.url))
        w.step({"client": 40}, latency={"client": {"main.read": [400_000_000] * 20}})
        w.now += 30  # the slow calls leave the window; fast ones come
        w.step({"client": 40}, latency={"client": {"main.read": [1_000_000] * 20}})
    finally:
        rec.close()
    firing, resolved = rec.posts
    assert firing["version"] == "4" and firing["status"] == "firing"
    (alert,) = firing["alerts"]
    assert alert["labels"]["service"] == "client" and alert["labels"]["alertname"]
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    ann = alert["annotations"]
    # the flame graph is linked (a path here: no external URL), never embedded
    svg = Path(ann["flamegraph_svg"]).read_text()
    assert svg.startswith("<svg") and "main.leak" in svg
    assert "/src/main.go:42" in svg  # rooted at the go statement
    folded = Path(ann["flamegraph_folded"]).read_text()
    assert "main.leak" in folded and folded.splitlines()[0].rsplit(" ", 1)[1].isdigit()
    assert Path(ann["goroutines_pprof"]).read_bytes()[:2] == b"\x1f\x8b"
    assert alert["generatorURL"] == ""
    assert "main.read" in ann["latency_histogram"] and "#" in ann["latency_histogram"]
    assert json.loads(ann["evidence"])["measured"] > 0.1
    assert resolved["status"] == "resolved"
    assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]
    assert resolved["alerts"][0]["startsAt"] == alert["startsAt"]
    assert resolved["alerts"][0]["endsAt"] > alert["startsAt"]


def test_a_webhook_receiver_that_is_down_is_retried_then_recorded_as_failed(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = World(report_dir=str(tmp_path))
    w.policy(webhook_policy(f"http://127.0.0.1:{port}/alerts"))
    w.step({"client": 40}, latency={"client": {"main.read": [400_000_000] * 20}})
    attempts = w.actions()
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4]
    assert [a["outcome"] for a in attempts] == ["will retry"] * 3 + ["failed"]
    assert all("refused" in a["error"].lower() for a in attempts)
    assert w.sleeps == [0.5, 1.0, 2.0]  # exponential backoff between attempts
    assert all(a["evidence"]["measured"] > 0.1 for a in attempts)
    # the decision stands (the service is degraded as far as the policy knows)
    assert w.decisions()[-1]["to_level"] == "L3"


def test_exec_gets_the_decision_in_env_and_the_evidence_as_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    script = (
        "import json, os, sys; d = json.load(sys.stdin); "
        "env = {k: v for k, v in os.environ.items() if k.startswith('GOLEASH_')}; "
        f"open({str(out)!r}, 'a').write(json.dumps({{'env': env, 'stdin': d}}) + '\\n')"
    )
    command = json.dumps([sys.executable, "-c", script])
    w = World(report_dir=str(tmp_path))
    w.policy(
        f"""
        mode: enforce
        rules:
          - name: g
            signal: {{kind: goroutines, above: 100}}
            levels: [{{level: L3, actions: [{{type: exec, command: {command}}}]}}]
            cooldown: {{initial: 1s}}
        """
    )
    w.step({"svc": 500})
    w.step({"svc": 5}, dt=2)
    degrade, recover = (json.loads(line) for line in out.read_text().splitlines())
    env = degrade["env"]
    assert env["GOLEASH_DECISION"] == "degrade" and env["GOLEASH_SERVICE"] == "svc"
    assert env["GOLEASH_GODEBUG"] == HTTP2_OFF and env["GOLEASH_TO_LEVEL"] == "L3"
    assert Path(env["GOLEASH_FLAMEGRAPH"]).read_text().startswith("<svg")
    assert degrade["stdin"]["evidence"]["goroutines"] == 500
    assert int(env["GOLEASH_DECISION_ID"]) == degrade["stdin"]["decision_id"]
    assert recover["env"]["GOLEASH_DECISION"] == "recover"
    assert recover["env"]["GOLEASH_GODEBUG"] == ""


def test_exec_failures_are_retried_and_reported(tmp_path: Path) -> None:
    script = "import sys; print('no route', file=sys.stderr); sys.exit(3)"
    command = json.dumps([sys.executable, "-c", script])
    w = World()
    w.policy(
        f"""
        mode: enforce
        rules:
          - name: g
            signal: {{kind: goroutines, above: 100}}
            levels: [{{level: L3, actions: [{{type: exec, command: {command}, retries: 1}}]}}]
        """
    )
    w.step({"svc": 500})
    assert [(a["attempt"], a["ok"]) for a in w.actions()] == [(1, False), (2, False)]
    assert "exited with 3: no route" in w.actions()[-1]["error"]
