"""The processes the demo starts: their output read line by line as it comes, and
every one of them stopped on the way out, newest first."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)  # (demo time, line)


class Processes:
    """What the demo started and has not stopped yet, in start order."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._procs: list[Proc] = []
        self._lock = threading.Lock()

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
        stderr_to: Path | None = None,
    ) -> Proc:
        err = open(stderr_to, "a") if stderr_to else subprocess.DEVNULL  # noqa: SIM115
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
        )
        p = Proc(name, popen)
        with self._lock:
            self._procs.append(p)

        def read() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                p.lines.append((self._clock(), line.rstrip("\n")))
                if on_line is not None:
                    with contextlib.suppress(ValueError, KeyError):
                        on_line(line)

        threading.Thread(target=read, name=f"read-{name}", daemon=True).start()
        return p

    def first_exited(self) -> bool:
        """Whether the first process started (goleash) has already exited."""
        with self._lock:
            return bool(self._procs) and self._procs[0].popen.poll() is not None

    def terminate(self, p: Proc, timeout: float = 10.0) -> None:
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait(timeout=5)
        with self._lock:
            if p in self._procs:
                self._procs.remove(p)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))  # client, server, then goleash
        for p in procs:
            self.terminate(p, timeout=20 if p.name == "goleash" else 5)
