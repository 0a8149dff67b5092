"""The `alertmanager` action against a real HTTP server on loopback that checks every
POST against Alertmanager's v2 API (`postableAlerts`) and keeps alerts as
Alertmanager does (identity = label set), with the policy engine driving it and
the control plane's evidence server answering the alerts' links."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import gobuild
from engineworld import World
from goleash.control.actions import ActionSpecError, build_action
from goleash.control.evidence_http import EvidenceServer

LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
ALERT_KEYS = {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}


def _time(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def schema_errors(body: Any) -> list[str]:
    """What Alertmanager's API would reject in a POST /api/v2/alerts body."""
    if not isinstance(body, list):
        return ["body is not a list of alerts"]
    errs = []
    for i, a in enumerate(body):
        if not isinstance(a, dict) or set(a) - ALERT_KEYS:
            errs.append(f"alert {i}: unknown keys {set(a) - ALERT_KEYS}")
            continue
        labels = a.get("labels")
        if not isinstance(labels, dict) or not labels:
            errs.append(f"alert {i}: labels are required")
            continue
        for k, v in {**labels, **a.get("annotations", {})}.items():
            if not isinstance(k, str) or not isinstance(v, str):
                errs.append(f"alert {i}: {k!r}: names and values are strings")
        errs += [f"alert {i}: bad label name {k!r}" for k in labels if not LABEL_NAME.fullmatch(k)]
        if "alertname" not in labels:
            errs.append(f"alert {i}: no alertname")
        for k in ("startsAt", "endsAt"):
            try:
                _time(a[k])
            except (KeyError, ValueError):
                errs.append(f"alert {i}: {k} is not an RFC 3339 time")
        url = a.get("generatorURL", "")
        if url and not re.match(r"https?://[^/]+(/|$)", url):
            errs.append(f"alert {i}: generatorURL {url!r} is not an absolute URL")
    return errs


class FakeAlertmanager:
    """POST /api/v2/alerts: 400 with the reason for a body Alertmanager would refuse;
    alerts kept by label set, the latest update winning, as its alert store does."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[list[dict[str, Any]]] = []
        self.alerts: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        self.errors: list[str] = []
        am = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                errs = [] if self.path == "/api/v2/alerts" else [f"no route {self.path}"]
                if self.headers.get("Content-Type") != "application/json":
                    errs.append("Content-Type is not application/json")
                errs += schema_errors(body)
                code = 400 if errs else am.status
                if code == 200:
                    am.posts.append(body)
                    for a in body:
                        am.alerts[tuple(sorted(a["labels"].items()))] = a
                am.errors += errs
                msg = "; ".join(errs).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def firing(self, at: float) -> list[dict[str, Any]]:
        return [a for a in self.alerts.values() if _time(a["endsAt"]) > at]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def am() -> Iterator[FakeAlertmanager]:
    a = FakeAlertmanager()
    yield a
    a.close()


def policy(url: str, extra: str = "") -> str:
    return f"""
    mode: enforce
    rules:
      - name: readframe
        signal: {{kind: function_latency, function: main.read, window: 10s, above: 100ms}}
        levels:
          - level: L3
            actions:
              - {{type: alertmanager, url: "{url}", retries: 2, retry_initial_seconds: 0.5{extra}}}
        cooldown: {{initial: 1s}}
    """


SLOW = {"client": {"main.read": [400_000_000] * 20}}
FAST = {"client": {"main.read": [1_000_000] * 20}}


def test_degrade_fires_one_alert_linked_to_served_evidence_and_recovery_resolves_it(
    am: FakeAlertmanager, tmp_path: Path
) -> None:
    evidence = EvidenceServer("127.0.0.1:0", tmp_path)
    try:
        external = f"http://{evidence.address}"
        w = World(report_dir=str(tmp_path), external_url=external)
        w.policy(policy(am.url, ', labels: {team: shop}, annotations: {runbook: "https://r/x"}'))
        w.step({"client": 40}, latency=SLOW)
        degraded_at = w.now
        assert am.errors == [] and len(am.posts) == 1
        (firing,) = am.firing(degraded_at)
        assert firing["labels"] == {
            "alertname": "GoleashDegraded",
            "service": "client",
            "rule": "readframe",
            "severity": "critical",
            "source": "goleash",
            "team": "shop",
        }
        assert _time(firing["startsAt"]) == pytest.approx(degraded_at)
        assert _time(firing["endsAt"]) > degraded_at + 3600  # held until recovery
        ann = firing["annotations"]
        assert ann["level"] == "L3" and ann["runbook"] == "https://r/x"
        assert "main.read" in ann["latency_histogram"]
        # the other severities of the same rule are resolved, not left firing
        assert {a["labels"]["severity"] for a in am.alerts.values()} == {
            "info",
            "warning",
            "critical",
        }

        # generatorURL: the flame graph, served by the control plane's evidence server
        url = firing["generatorURL"]
        assert url.startswith(external + "/evidence/") and url.endswith(".svg")
        assert ann["flamegraph_svg"] == url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/svg+xml"
            svg = resp.read().decode()
        assert svg.startswith("<svg") and "main.leak" in svg
        with urllib.request.urlopen(ann["flamegraph_folded"], timeout=10) as resp:
            assert "main.leak" in resp.read().decode()
        # the pprof link is a profile `go tool pprof` reads straight from the URL
        tc = gobuild.TOOLCHAINS[-1]
        top = subprocess.run(
            [
                str(gobuild.go_root(tc) / "bin" / "go"),
                "tool",
                "pprof",
                "-top",
                ann["goroutines_pprof"],
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=gobuild.go_env(tc),
        )
        assert top.returncode == 0, top.stderr
        assert "main.leak" in top.stdout and "Type: goroutine" in top.stdout

        w.now += 30  # the slow calls leave the window; fast ones come
        w.step({"client": 40}, latency=FAST)
        assert am.errors == [] and len(am.posts) == 2
        assert am.firing(w.now) == []
        resolved = am.alerts[tuple(sorted(firing["labels"].items()))]
        assert _time(resolved["endsAt"]) == pytest.approx(w.now)
        assert _time(resolved["startsAt"]) == pytest.approx(degraded_at)
        assert resolved["generatorURL"] == url  # still the evidence of the degrade
    finally:
        evidence.stop()


def test_without_an_external_url_alerts_carry_no_generator_url(
    am: FakeAlertmanager, tmp_path: Path
) -> None:
    w = World(report_dir=str(tmp_path))
    w.policy(policy(am.url + "/"))  # a trailing slash on the base URL is fine
    w.step({"client": 40}, latency=SLOW)
    assert am.errors == []
    (firing,) = am.firing(w.now)
    assert "generatorURL" not in firing
    assert Path(firing["annotations"]["flamegraph_svg"]).read_text().startswith("<svg")


def test_a_rejected_body_is_not_retried_a_down_alertmanager_is(tmp_path: Path) -> None:
    refusing = FakeAlertmanager(status=400)
    down = FakeAlertmanager(status=503)
    try:
        for server, attempts in ((refusing, [1]), (down, [1, 2, 3])):
            w = World(report_dir=str(tmp_path))
            w.policy(policy(server.url))
            w.step({"client": 40}, latency=SLOW)
            got = w.actions()
            assert [a["attempt"] for a in got] == attempts
            assert got[-1]["outcome"] == "failed"
            assert f"answered {server.status}" in got[-1]["error"]
    finally:
        refusing.close()
        down.close()


def test_evidence_server_serves_only_report_files(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "a.svg").write_text("<svg/>")
    (tmp_path / "secret.svg").write_text("no")
    (reports / "link.svg").symlink_to(tmp_path / "secret.svg")
    (reports / "notes.txt").write_text("no")
    server = EvidenceServer("127.0.0.1:0", reports)
    base = f"http://{server.address}"
    try:
        with urllib.request.urlopen(base + "/evidence/a.svg", timeout=10) as resp:
            assert resp.read() == b"<svg/>"
        for path in ("/evidence/link.svg", "/evidence/notes.txt", "/evidence/../secret.svg"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path, timeout=10)
            assert info.value.code == 404, path
        for path in ("/evidence/%2e%2e%2fsecret.svg", "/", "/evidence/"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base + path, timeout=10)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"url": "alertmanager:9093"}, "url"),
        ({"labels": {"bad-name": "x"}}, "labels"),
        ({"labels": {"service": "x"}}, "labels"),
        ({"annotations": {"a": 1}}, "annotations"),
        ({"hold_seconds": 0}, "hold_seconds"),
    ],
)
def test_bad_specs_name_the_key(extra: dict[str, Any], field: str) -> None:
    spec = {"type": "alertmanager", "url": "http://am:9093", **extra}
    with pytest.raises(ActionSpecError) as info:
        build_action(spec)
    assert info.value.field == field


def test_control_plane_serves_its_reports_at_evidence_listen(tmp_path: Path) -> None:
    import sys

    exe = Path(sys.executable).parent / "goleash"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "goleash.cli"]
    proc = subprocess.Popen(
        [*cmd, "control-plane", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "g.db")]
        + ["--evidence-listen", "127.0.0.1:0", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []  # up to "listening on": then SIGTERM is handled
        while not lines or "listening on" not in lines[-1]:
            lines.append(json.loads(proc.stderr.readline())["message"])
        (line,) = [x for x in lines if x.startswith("evidence on ")]
        address = line.split("evidence on ", 1)[1].split(",")[0]
        (tmp_path / "reports").mkdir(exist_ok=True)
        (tmp_path / "reports" / "x.folded").write_text("main.main;main.leak 3\n")
        with urllib.request.urlopen(f"http://{address}/evidence/x.folded", timeout=10) as resp:
            assert resp.read() == b"main.main;main.leak 3\n"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
