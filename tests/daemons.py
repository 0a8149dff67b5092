"""goleash daemons (agent, control plane) run as subprocesses by end-to-end tests."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]


class Daemon:
    """A goleash subprocess whose stderr is collected; `wait_line` finds a line."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*GOLEASH, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no line matching {pattern!r} in:\n{self.log}")
                self._cv.wait(min(left, 0.2))

    def check_alive(self) -> None:
        assert self.proc.poll() is None, f"goleash {self.args[0]} died:\n{self.log[-5000:]}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Its exit code after `sig`; one that does not exit in time is killed (no
        daemon outlives its test) and the test fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def stop_both(agent: Daemon, cp: Daemon) -> None:
    """Stop the agent, then the control plane whatever the agent did; the agent must
    have exited cleanly."""
    try:
        code = agent.stop()
    finally:
        cp.stop()
    assert code == 0, agent.log


def node_args(interval: float) -> list[str]:
    """What tests give `goleash agent` and `goleash run`: a report every INTERVAL s,
    orphans at any age, health and metrics on ports of their own choosing."""
    return [
        "--interval",
        str(interval),
        "--orphan-min-age",
        "0",
        "--health-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]


def agent_args(server: str, interval: float, *more: str) -> list[str]:
    return ["agent", "--server", server, *node_args(interval), *more]
