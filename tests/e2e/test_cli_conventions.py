"""The `goleash` command's habits, through the real CLI against a real control plane:
options anywhere, the subcommand's usage on a bad option, `policy set --dry-run
FILE`, `top` into a pipe vs a terminal, timestamped and JSON logs, completion."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GOLEASH, *args], capture_output=True, text=True, timeout=60, env=env)


class ControlPlane:
    """`goleash control-plane --log-format json`: its first log line says where it listens."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen(
            [*GOLEASH, "control-plane", "--listen", "127.0.0.1:0", "--db", str(db)]
            + ["--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        self.address = ""
        while not self.address and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on " in line:
                self.address = line.split("listening on ", 1)[1].split()[0].rstrip('",')
        assert self.address, "".join(self.lines)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    c = ControlPlane(tmp_path / "goleash.db")
    yield c
    c.stop()


def test_logs_are_json_objects_with_timestamps(cp: ControlPlane) -> None:
    first = json.loads(cp.lines[-1])
    assert re.fullmatch(RFC3339, first["time"]), first
    assert first["level"] == "info" and "listening on" in first["message"]
    assert first["command"] == "control-plane" and first["logger"]


def test_global_options_before_or_after_the_subcommand(cp: ControlPlane) -> None:
    for args in (
        ("--server", cp.address, "ps", "--json"),
        ("ps", "--json", "--server", cp.address),
        (f"--server={cp.address}", "--timeout", "5", "ps", "--json", "--log-level", "debug"),
    ):
        res = cli(*args)
        assert res.returncode == 0, (args, res.stderr)
        assert json.loads(res.stdout) == []


def test_policy_set_dry_run_as_the_help_shows_it(cp: ControlPlane, tmp_path: Path) -> None:
    pol = tmp_path / "pol.yaml"
    pol.write_text("mode: monitor\nrules:\n  - name: g\n    signal: {kind: goroutines}\n")
    res = cli("policy", "set", "--dry-run", str(pol), "--server", cp.address)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{pol}: valid; version")
    got = cli("policy", "get", "--server", cp.address)
    assert "no policy set" in got.stderr  # a dry run changes nothing


def test_a_bad_option_names_the_subcommand_in_one_line() -> None:
    # The subcommand's own parser answers (not the top-level usage), in one line that
    # says where its help is: scripts and people both read it (issue 10 asked for one
    # line, issue 14 for the subcommand's word rather than the top-level usage).
    res = cli("dump", "--pid", "1", "--bogus")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("goleash dump: error: unrecognized arguments: --bogus")
    assert "goleash dump --help" in res.stderr
    res = cli("ps", "--window", "soon")
    assert res.returncode == 2 and res.stderr.startswith("goleash ps: error: argument --window")
    assert "Traceback" not in res.stderr


def test_top_writes_plain_snapshots_into_a_pipe(cp: ControlPlane) -> None:
    res = cli("top", "--server", cp.address, "-n", "2", "--interval", "0.1")
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout
    assert len(re.findall(r"^goleash top  ", res.stdout, re.M)) == 2


def test_top_clears_the_screen_on_a_terminal(cp: ControlPlane) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*GOLEASH, "top", "--server", cp.address, "-n", "1"],
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no output from top on a terminal: {out!r}"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        assert proc.wait(timeout=30) == 0
        os.close(master)
    assert out.startswith(b"\x1b[H\x1b[2J") and b"goleash top" in out


def test_shell_completion_of_options_and_choices(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    for line, want in (("goleash dump --for", "--format"), ("goleash dump --format p", "pprof")):
        env = dict(
            os.environ,
            _ARGCOMPLETE="1",
            COMP_LINE=line,
            COMP_POINT=str(len(line)),
            _ARGCOMPLETE_STDOUT_FILENAME=str(out),
        )
        res = cli(env=env)
        assert res.returncode == 0, res.stderr
        assert want in out.read_text().split()
