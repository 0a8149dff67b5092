"""`goleash record` + `goleash diff` on a real service upgrade, with real probes.

tests/fixtures/go/upgradesvc in two builds: "before" (Go 1.22, IdleTimeout set, a
watcher that ends with its request, a 2 ms handler) and "after" (the newest Go, no
IdleTimeout, a watcher with no cancel path, a 20 ms handler), both under the same
load: a client that opens a keep-alive connection every 50 ms, makes one request
and leaves the connection idle. The diff must flag the growing `(*conn).serve` and
watcher sites and the handler's latency, show the Go upgrade, and exit 1 with
`--fail-on growth`; the "before" build against a second run of itself must show
nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import gobuild

pytestmark = pytest.mark.root

AGENT = Path(__file__).resolve().parents[2] / "agent"
BEFORE_GO = "1.22.10"
AFTER_GO = gobuild.TOOLCHAINS[-1]
RECORD_S = 8


class _Load(threading.Thread):
    """A new keep-alive connection every 50 ms, one request each, then left idle."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        self.ok = 0

    def run(self) -> None:
        while not self.stop.wait(0.05) and len(self.socks) < 1000:
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                s.sendall(b"GET / HTTP/1.1\r\nHost: upgradesvc\r\n\r\n")
                if b"ok" in s.recv(4096):
                    self.ok += 1
                self.socks.append(s)
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        for s in self.socks:
            s.close()


def _serve(toolchain: str, variant: str) -> tuple[subprocess.Popen[str], int]:
    exe = gobuild.build("upgradesvc", toolchain)
    p = subprocess.Popen(
        [str(exe), "-variant", variant], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("listening on "), line
    return p, int(line.rsplit(":", 1)[1])


def _goleash(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(AGENT))
    return subprocess.run(
        [sys.executable, "-m", "goleash.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for v in (BEFORE_GO, AFTER_GO):
        try:
            gobuild.go_root(v)
        except gobuild.ToolchainMissing as exc:
            pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("rec")
    runs = {"before": (BEFORE_GO, "before"), "after": (AFTER_GO, "after"),
            "again": (BEFORE_GO, "before")}  # fmt: skip
    servers, loads, recs = [], [], {}
    env = dict(os.environ, PYTHONPATH=str(AGENT))
    try:
        for name, (go, variant) in runs.items():
            proc, port = _serve(go, variant)
            servers.append(proc)
            load = _Load(port)
            load.start()
            loads.append(load)
            recs[name] = subprocess.Popen(
                [sys.executable, "-m", "goleash.cli", "record", "--pid", str(proc.pid),
                 "--duration", str(RECORD_S), "--interval", "1", "--func", "main.handle",
                 "-o", str(out / f"{name}.json")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        for name, r in recs.items():
            _, err = r.communicate(timeout=150)
            assert r.returncode == 0, f"{name}: {err}"
        assert all(ld.ok > 20 for ld in loads), [ld.ok for ld in loads]
    finally:
        for ld in loads:
            ld.close()
        for p in servers:
            p.kill()
            p.wait()
    return {name: out / f"{name}.json" for name in runs}


def _row(rows: list[dict], needle: str) -> dict:
    found = [r for r in rows if needle in r["subject"]]
    assert found, (needle, [r["subject"] for r in rows])
    return found[0]


def test_record_holds_build_sites_and_latency(recordings: dict[str, Path]) -> None:
    rec = json.loads(recordings["after"].read_text())
    assert rec["build"]["go_version"] == f"go{AFTER_GO}"
    assert rec["build"]["main_module"] == "example.com/upgradesvc"
    serve = next(s for s in rec["sites"] if s["function"] == "net/http.(*conn).serve")
    assert serve["live_end"] > serve["live_start"] and serve["growth_per_min"] > 60
    assert len(serve["samples"]) >= RECORD_S - 1
    handle = next(f for f in rec["functions"] if f["symbol"] == "main.handle")
    assert handle["count"] > 20 and handle["p50_ns"] >= 20e6


def test_diff_flags_the_upgrade(recordings: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "diff.html"
    res = _goleash(
        "diff", str(recordings["before"]), str(recordings["after"]),
        "--fail-on", "growth", "--json", "--html", str(page),
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    d = json.loads(res.stdout)
    assert d["failed"] == ["growth"]
    go = _row(d["build"], "Go version")
    assert go["before"] == f"go{BEFORE_GO}" and go["after"] == f"go{AFTER_GO}"
    serve = _row(d["sites"], "net/http.(*conn).serve")
    assert serve["flagged"] and "growing" in serve["verdict"]
    watcher = _row(d["sites"], "main.watch")
    assert watcher["flagged"] and "growing" in watcher["verdict"]
    _, line = gobuild.marker_line("upgradesvc", "watcher")
    assert f"main.go:{line}" in watcher["subject"]
    handle = _row(d["functions"], "main.handle")
    assert handle["flagged"] and "p50 slower" in handle["verdict"]
    html = page.read_text()
    assert "<svg" in html and "main.watch" in html and "<script" not in html


def test_a_build_against_itself_flags_nothing(recordings: dict[str, Path]) -> None:
    res = _goleash(
        "diff", str(recordings["before"]), str(recordings["again"]),
        "--fail-on", "growth,new-site,p50:+20%", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout
    d = json.loads(res.stdout)
    assert d["failed"] == []
    assert [r for r in d["build"] + d["sites"] + d["functions"] if r["flagged"]] == []


def test_diff_rejects_bad_input(recordings: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = _goleash("diff", str(recordings["before"]), str(bad))
    assert res.returncode == 2 and "not a `goleash record` report" in res.stderr
    res = _goleash("diff", str(recordings["before"]), str(recordings["after"]), "--fail-on", "x")
    assert res.returncode == 2 and "--fail-on" in res.stderr
