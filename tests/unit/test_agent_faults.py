"""Fault isolation in the node agent and the one-process commands, without BPF:
a process whose executable is damaged, whose judging or attaching or reading fails
in unexpected ways, is that process's counted failure, never the agent's end; the
CLI refuses nonsense before doing anything, with one line and exit 2."""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import gobuild
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.cli import main
from goleash.errors import StageFailure
from goleash.node import agent as agent_mod
from goleash.node import discovery as discovery_mod
from goleash.node.agent import Agent
from goleash.node.agentconfig import AgentConfig
from goleash.node.discovery import JUDGE_ATTEMPTS, Candidate, Discovery, Selector
from goleash.node.faults import MAX_PROCESS_FAILURES
from goleash.node.followed import Followed
from goleash.node.metrics import MetricsServer
from goleash.probes.procmem import start_time

SELF = os.getpid()


def _stat(pid: int, start: int) -> str:
    return f"{pid} (x) S 1 " + " ".join(["0"] * 17) + f" {start} 0 0\n"


def _fake_proc(root: Path, procs: dict[int, str]) -> str:
    for pid, exe in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(_stat(pid, 100 + pid))
        (d / "cgroup").write_text("0::/user.slice\n")
        (d / "exe").symlink_to(exe)
    return str(root)


@pytest.fixture(scope="module")
def go_binary() -> str:
    return str(gobuild.build("populations", "1.22.10"))


def _damaged(tmp: Path, go_binary: str) -> str:
    """The Go binary with its section table pointed past the end (runs, cannot be read)."""
    data = bytearray(Path(go_binary).read_bytes())
    struct.pack_into("<Q", data, 0x28, 1 << 62)
    p = tmp / "damaged"
    p.write_bytes(data)
    return str(p)


# --- discovery --------------------------------------------------------------------------------


def test_a_damaged_binary_is_counted_once_and_never_stops_the_scan(
    tmp_path: Path, go_binary: str
) -> None:
    bad = _damaged(tmp_path, go_binary)
    root = _fake_proc(tmp_path / "proc", {10: bad, 11: go_binary, 12: bad})
    errors: list[tuple[int, str]] = []
    d = Discovery(
        Selector(),
        proc_root=root,
        self_pid=1,
        on_error=lambda pid, exe, exc, key: errors.append((pid, type(exc).__name__)),
    )
    assert [c.pid for c in d.scan().appeared] == [11]
    # One file version, one verdict, one count: 12 runs the same damaged file.
    assert errors == [(10, "DamagedBinaryError")]
    d.scan()
    assert len(errors) == 1


def test_an_unexpected_failure_judging_one_process_is_retried_then_left_alone(
    tmp_path: Path, go_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    shutil.copy(go_binary, other)
    root = _fake_proc(tmp_path / "proc", {20: str(other), 21: go_binary})
    real = discovery_mod.read_build_info

    def flaky(binary: Any) -> Any:
        if str(binary.path).endswith("/20/exe"):
            raise RecursionError("hostile input")
        return real(binary)

    monkeypatch.setattr(discovery_mod, "read_build_info", flaky)
    errors: list[int] = []
    d = Discovery(
        Selector(),
        proc_root=root,
        self_pid=1,
        on_error=lambda pid, exe, exc, key: errors.append(pid),
    )
    assert [c.pid for c in d.scan().appeared] == [21]
    for _ in range(JUDGE_ATTEMPTS + 2):
        d.scan()
    assert errors == [20] * JUDGE_ATTEMPTS


def test_cheap_selectors_come_before_any_elf_is_read(tmp_path: Path, go_binary: str) -> None:
    bad = _damaged(tmp_path, go_binary)
    root = _fake_proc(tmp_path / "proc", {30: go_binary, 31: bad, 32: "/bin/true"})
    errors: list[int] = []
    d = Discovery(
        Selector(pids=frozenset({30})),
        proc_root=root,
        self_pid=1,
        on_error=lambda pid, exe, exc, key: errors.append(pid),
    )
    assert [c.pid for c in d.scan().appeared] == [30]
    assert errors == [] and len(d._verdicts) == 1  # 31 and 32 were never opened
    by_exe = Discovery(Selector(exe_globs=("true",)), proc_root=root, self_pid=1)
    assert by_exe.scan().appeared == [] and len(by_exe._verdicts) == 1  # only /bin/true


# --- the agent ---------------------------------------------------------------------------------


def _agent() -> Agent:
    return Agent(
        AgentConfig(server="127.0.0.1:1", health_listen=None, metrics_listen=None, interval=1.0)
    )


def _candidate(pid: int = SELF) -> Candidate:
    start = start_time(pid)
    assert start is not None
    return Candidate(pid, start, "/usr/bin/svc\x1b[31m", (1, 2, 3, 4), "go1.22.10", None, (), None)


def test_an_unexpected_attach_failure_is_retried_with_backoff_then_untraceable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(pid: int) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(agent_mod.GoProcess, "attach", staticmethod(boom))
    a, c = _agent(), _candidate()
    assert a.follow(c) is None
    assert a.process_errors == {"attach": 1} and c.key in a.faults.retry_at
    assert a.follow(c) is None  # backing off: not tried, not counted
    assert a.process_errors == {"attach": 1}
    for _ in range(MAX_PROCESS_FAILURES - 1):
        a.faults.retry_at[c.key] = 0.0  # the backoff has passed
        assert a.follow(c) is None
    assert a.process_errors == {"attach": MAX_PROCESS_FAILURES}
    assert a.untraceable[c.key] == "errors"
    # logged once per process and stage, with PID, executable (escaped) and stage
    lines = [r.getMessage() for r in caplog.records if "attach failed" in r.getMessage()]
    assert len(lines) == 1 and f"PID {SELF}" in lines[0] and "\x1b" not in lines[0]
    assert "\\x1b[31m" in lines[0] and "KeyError" in lines[0]
    # and the control plane hears of it in the next batch's agent-level drops
    assert a.buffer.drop_counts()["process_errors_attach"] == MAX_PROCESS_FAILURES
    assert a.view().process_errors == {"attach": MAX_PROCESS_FAILURES}
    assert "process_errors_attach" not in a.view().batch_drops


class _FailingTracker:
    mode, mode_reason = "probes", ""

    def __init__(self) -> None:
        self.closed = False

    def snapshot(self) -> Any:
        raise StageFailure("inventory", ValueError("torn allgs"))

    def close(self) -> None:
        self.closed = True


def _followed(c: Candidate, tracker: Any) -> Followed:
    proc = SimpleNamespace(
        pid=c.pid,
        start_time=c.start_ticks,
        same_executable=lambda: True,
        close=lambda: None,
    )
    return Followed(c, proc, tracker, None, "svc", t.ProcessInfo(pid=c.pid))  # type: ignore[arg-type]


def test_a_failing_snapshot_is_counted_by_stage_and_given_up_after_n() -> None:
    a, c = _agent(), _candidate()
    tracker = _FailingTracker()
    a.followed[c.pid] = _followed(c, tracker)
    for _ in range(MAX_PROCESS_FAILURES - 1):
        assert a._snapshot(a.followed[c.pid]) is None
    assert a.process_errors == {"inventory": MAX_PROCESS_FAILURES - 1}
    assert c.pid in a.followed and not tracker.closed
    assert a._snapshot(a.followed[c.pid]) is None
    assert c.pid not in a.followed and tracker.closed  # probes detached
    assert a.untraceable[c.key] == "errors"
    assert [g.reason for g in a._pending_gone] == ["untraceable: repeated errors"]


def test_a_process_gone_mid_snapshot_is_finished_quietly() -> None:
    a, c = _agent(), _candidate()
    tracker = _FailingTracker()
    f = _followed(c, tracker)
    f.proc.same_executable = lambda: False  # type: ignore[attr-defined]  # exec'd meanwhile
    a.followed[c.pid] = f
    assert a._snapshot(f) is None
    assert a.process_errors == {} and tracker.closed
    assert [g.reason for g in a._pending_gone] == ["exited"]


def test_process_errors_on_metrics() -> None:
    a = _agent()
    a.process_errors.update({"judge": 2, "stacks": 1})
    m = MetricsServer("127.0.0.1:0", a.view)
    try:
        with urllib.request.urlopen(f"http://{m.address}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        m.stop()
    assert 'goleash_agent_process_errors_total{stage="judge"} 2.0' in text
    assert 'goleash_agent_process_errors_total{stage="stacks"} 1.0' in text


# --- the CLI ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["trace", "--pid", "1", "--duration", "0"],
        ["trace", "--pid", "1", "--interval", "-1"],
        ["trace", "--pid", "1", "--duration", "nan"],
        ["trace", "--pid", "1", "--budget", "inf"],
        ["latency", "--pid", "1", "--func", "x", "--interval", "1e400"],
        ["latency", "--pid", "1", "--func", "x", "--budget", "-0.5"],
        ["panics", "--pid", "1", "--duration", "-5"],
        ["dump", "--pid", "0"],
        ["dump", "--pid", "-3"],
        ["agent", "--interval", "0"],
        ["run", "--budget", "NaN"],
        ["run", "--pid", "x"],
        ["top", "--interval", "inf"],
        ["symbolize", "/bin/true", "zz"],
    ],
)
def test_nonsense_arguments_are_refused_in_one_line(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: argument" in err, err


def test_policy_check_at_a_terminal_asks_for_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    assert main(["policy", "check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "policy YAML file" in err


@pytest.mark.parametrize("command", [["trace"], ["dump"], ["latency", "--func", "main.x"]])
def test_one_process_commands_on_a_non_go_pid_exit_2_without_traceback(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """This test process is Python, not Go: a message naming it, exit 2."""
    assert main([*command, "--pid", str(SELF)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"goleash {command[0]}: PID {SELF}") and "Traceback" not in err, err


@pytest.mark.parametrize("server", ["not an address", "127.0.0.1:99999", "host:port:x", ":7070"])
def test_an_impossible_control_plane_address_stops_the_agent_at_start(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["agent", "--server", server, "--pid", "999999", "--health-listen", "off"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("goleash agent: --server") and err.count("\n") == 1, err
