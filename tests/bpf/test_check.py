"""`goleash check -- go test ./...` on a real Go module: real BPF, real test binaries.

The fixture module (tests/fixtures/go/leakcheck) has one test leaking a goroutine
blocked on a channel receive, one leaking a ticker loop, one clean package, and one
test that stops its goroutine in t.Cleanup. goleash must name exactly the two
leaking tests, with their `go` statements, and pass the clean packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import gobuild
import polling

pytestmark = pytest.mark.root

MODULE = gobuild.FIXTURES / "leakcheck"
AGENT = Path(__file__).resolve().parents[2] / "agent"
# The oldest toolchain (no g.parentGoid) and the newest.
EDGE_TOOLCHAINS = [gobuild.TOOLCHAINS[0], gobuild.TOOLCHAINS[-1]]


def _site(pkg: str, marker: str) -> str:
    name, line = gobuild.marker_line(f"leakcheck/{pkg}", marker)
    return f"{pkg}/{name}:{line}"


def _check(toolchain: str, *args: str, junit: Path | None = None) -> tuple[int, dict, str]:
    env = gobuild.go_env(toolchain)
    env["PYTHONPATH"] = str(AGENT)
    cmd = [sys.executable, "-m", "goleash.cli", "check", "--json"]
    if junit is not None:
        cmd += ["--junit", str(junit)]
    res = subprocess.run(
        [*cmd, "--", "go", "test", "-count=1", *args],
        cwd=MODULE,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # With --json the command's own output goes to stderr: stdout is the report alone.
    return res.returncode, json.loads(res.stdout), res.stderr


@pytest.fixture(params=EDGE_TOOLCHAINS, ids=lambda v: f"go{v}")
def edge_toolchain(request: pytest.FixtureRequest) -> str:
    try:
        gobuild.go_root(request.param)
    except gobuild.ToolchainMissing as exc:
        pytest.skip(str(exc))
    return request.param


def test_check_names_exactly_the_leaking_tests(edge_toolchain: str, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    rc, rep, stderr = _check(edge_toolchain, "./...", junit=junit)
    assert rc == 1, stderr
    assert rep["command_exit_code"] == 0
    failing = {(lk["package"], lk["test"]): lk for lk in rep["leaks"] if not lk["known"]}
    assert set(failing) == {
        ("example.com/leakcheck/chanleak", "TestWatchLeaks"),
        ("example.com/leakcheck/tickleak", "TestPollLeaks"),
    }, rep["leaks"]
    chan = failing[("example.com/leakcheck/chanleak", "TestWatchLeaks")]
    tick = failing[("example.com/leakcheck/tickleak", "TestPollLeaks")]
    assert chan["go_statement"].endswith(_site("chanleak", "chanleak"))
    assert tick["go_statement"].endswith(_site("tickleak", "tickleak"))
    assert chan["count"] == 1 and tick["count"] == 1
    assert chan["created_by"] == "example.com/leakcheck/chanleak.Watch"
    assert tick["created_by"] == "example.com/leakcheck/tickleak.Poll"
    assert any("chanleak.go" in f for f in chan["stack"])
    # Before Go 1.22 `go f(x)` starts a closure named like any other (Watch.func1).
    if tuple(int(x) for x in edge_toolchain.split(".")[:2]) >= (1, 22):
        assert chan["function"] == "example.com/leakcheck/chanleak.watch"
        assert tick["function"] == "example.com/leakcheck/tickleak.poll"
    # Every test binary was followed and every test seen, the clean ones included.
    seen = {p["package"]: set(p["tests"]) for p in rep["processes"]}
    assert seen["example.com/leakcheck/cleanup"] == {"TestWorkerStoppedInCleanup"}
    assert seen["example.com/leakcheck/clean"] == {"TestSum", "TestSubtests"}
    assert all(p["captured_at_exit"] for p in rep["processes"])

    root = ET.parse(junit).getroot()
    failed = {
        (case.get("classname"), case.get("name"))
        for case in root.iter("testcase")
        if case.find("failure") is not None
    }
    assert failed == set(failing)
    passed = {c.get("name") for c in root.iter("testcase") if c.find("failure") is None}
    assert {"TestWorkerStoppedInCleanup", "TestSum", "TestNothing"} <= passed


def test_check_passes_clean_packages(edge_toolchain: str) -> None:
    rc, rep, stderr = _check(edge_toolchain, "./clean", "./cleanup")
    assert rc == 0, (stderr, rep["leaks"])
    assert "ok  \texample.com/leakcheck/clean" in stderr  # go test's own lines
    assert rep["leaks"] == []
    assert rep["clean"] is True
    assert {p["package"] for p in rep["processes"]} == {
        "example.com/leakcheck/clean",
        "example.com/leakcheck/cleanup",
    }


def test_check_baseline_fails_only_on_new_leaks(tmp_path: Path) -> None:
    toolchain = EDGE_TOOLCHAINS[-1]
    _, first, _ = _check(toolchain, "./chanleak")
    assert [lk["test"] for lk in first["leaks"]] == ["TestWatchLeaks"]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(first))
    env = gobuild.go_env(toolchain)
    env["PYTHONPATH"] = str(AGENT)
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "check", "--baseline", str(baseline), "--",
         "go", "test", "-count=1", "./chanleak", "./tickleak"],
        cwd=MODULE, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "LEAK example.com/leakcheck/tickleak TestPollLeaks" in res.stdout
    assert "KNOWN example.com/leakcheck/chanleak TestWatchLeaks" in res.stdout


def test_check_returns_the_command_exit_code() -> None:
    env = dict(os.environ, PYTHONPATH=str(AGENT))
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "check", "--", "sh", "-c", "exit 3"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "exited 3" in res.stdout


def test_check_captures_goroutines_blocked_at_exit_of_a_program() -> None:
    toolchain = EDGE_TOOLCHAINS[-1]
    env = gobuild.go_env(toolchain)
    env["PYTHONPATH"] = str(AGENT)
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "check", "--json", "--", "go", "run",
         "./cmd/exitleak"],
        cwd=MODULE, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    rep = json.loads(res.stdout)
    (leak,) = rep["leaks"]
    assert leak["test"] == "" and leak["function"] == "main.wait"
    assert leak["wait_reason"] == "chan receive"
    assert leak["go_statement"].endswith(_site("cmd/exitleak", "exitleak"))
    (proc,) = rep["processes"]
    assert proc["test_binary"] is False and proc["captured_at_exit"]


def test_check_reports_the_last_tests_leak_when_main_exits_at_once(edge_toolchain: str) -> None:
    # testing releases the main goroutine before the last test's runner goroutine
    # exits; TestMain's os.Exit can come first. Exiting from the main goroutine means
    # every test ended, recorded or not.
    rc, rep, stderr = _check(edge_toolchain, "./testdata/exitmain")
    assert rc == 1, stderr
    assert [lk["test"] for lk in rep["leaks"]] == ["TestLeaksLast"], rep["leaks"]
    assert rep["leaks"][0]["wait_reason"] == "chan receive"
    assert rep["leaks"][0]["go_statement"].endswith(_site("testdata/exitmain", "exitmain"))
    (proc,) = rep["processes"]
    assert proc["tests"] == ["TestLeaksLast", "TestNothing"]
    assert proc["exit_goroutine"] == 1  # the main goroutine, read from R14 at runtime.exit


def test_check_os_exit_inside_a_test_cuts_it_short_no_leak(edge_toolchain: str) -> None:
    rc, rep, stderr = _check(edge_toolchain, "./testdata/exitintest")
    assert rc == 1 and rep["command_exit_code"] == 1, stderr  # go test's FAIL
    assert "exit status 3" in stderr
    assert rep["leaks"] == []
    (proc,) = rep["processes"]
    assert proc["tests"] == ["TestExitsInside"] and proc["captured_at_exit"]
    assert proc["exit_goroutine"] not in (0, 1)  # the test's own goroutine


def test_check_holds_a_go_program_started_by_any_other_command(edge_toolchain: str) -> None:
    # Not `go test`/`go run`: the command is held before its exec until the probes
    # follow it, so a Go program it execs is checked from its first instruction.
    exe = gobuild.build("leakcheck/cmd/exitleak", edge_toolchain)
    env = dict(os.environ, PYTHONPATH=str(AGENT))
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "check", "--json", "--", "sh", "-c",
         f'"{exe}"; echo done'],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    rep = json.loads(res.stdout)
    assert [(lk["test"], lk["wait_reason"]) for lk in rep["leaks"]] == [("", "chan receive")]
    (proc,) = rep["processes"]
    assert proc["captured_at_exit"]


def test_check_gate_keeps_the_users_goflags(tmp_path: Path) -> None:
    # `go test` runs its test binaries through goleash's gate (GOFLAGS=-exec=...);
    # the tests must see the user's GOFLAGS, not goleash's.
    toolchain = EDGE_TOOLCHAINS[-1]
    env = gobuild.go_env(toolchain)
    env["PYTHONPATH"] = str(AGENT)
    env["GOFLAGS"] = "-mod=mod -count=1"
    out = tmp_path / "goflags.txt"
    env["GOLEASH_TEST_GOFLAGS_OUT"] = str(out)
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "check", "--json", "--", "go", "test",
         "./testdata/goflags"],
        cwd=MODULE, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert out.read_text() == "-mod=mod -count=1|unset"
    rep = json.loads(res.stdout)
    assert [p["tests"] for p in rep["processes"]] == [["TestGoflags"]]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_sigterm_while_the_probes_load_leaves_nothing_behind(delay: float) -> None:
    # A CI timeout's SIGTERM can come while BCC compiles: `go test` already runs and
    # its test binaries wait at the gate. goleash must take the command down with it,
    # whatever it was doing (an import once swallowed the interrupt): several moments.
    env = gobuild.go_env(EDGE_TOOLCHAINS[-1])
    env["PYTHONPATH"] = str(AGENT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "goleash.cli", "check", "--", "go", "test", "-count=1",
         "./..."],
        cwd=MODULE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    go = polling.wait_for(lambda: next(iter(_children(proc.pid)), None), "go test started")
    time.sleep(delay)  # not for luck: the moment of the signal is the test's parameter
    tree = {go, *_children(go)}
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:  # a hung check must not outlive its test (nor hold probes on the host)
        if proc.poll() is None:
            for p in [proc.pid, *tree]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
    assert proc.returncode in (130, 143), err  # interrupted while loading, or forwarded
    polling.wait_for(
        lambda: not any(Path(f"/proc/{p}").exists() for p in tree) or None,
        "the command's processes gone",
        timeout=10,
    )


def test_check_falls_back_to_perf_event_uprobes(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Kernels before 6.6 have no uprobe_multi links: one perf-event uprobe per site.
    from goleash.node.check import run_check
    from goleash.probes import uprobe

    def refused(*_args: object) -> int:
        raise OSError(22, "uprobe_multi link: Invalid argument")

    monkeypatch.setattr(uprobe, "attach_multi", refused)
    monkeypatch.chdir(MODULE)
    for k, v in gobuild.go_env(EDGE_TOOLCHAINS[-1]).items():
        monkeypatch.setenv(k, v)
    rep = run_check(["go", "test", "-count=1", "./chanleak"])
    assert rep.exit_code == 0, capfd.readouterr().err
    assert [(lk.test, lk.wait_reason) for lk in rep.leaks] == [("TestWatchLeaks", "chan receive")]
