"""The policy engine on the control plane's event loop: it evaluates every interval,
reloads the policy file when it changes, and runs actions on worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from goleash.control.engine import PolicyEngine
from goleash.control.engine_runners import ThreadRunner
from goleash.control.events import EventLog
from goleash.control.policy import PolicyStore
from goleash.control.state import Store

log = logging.getLogger("goleash.control.engine")


class EngineLoop:
    """The engine on the control plane's event loop: evaluates every interval, reloads
    the policy file when it changes, runs actions on worker threads."""

    def __init__(
        self,
        store: Store,
        events: EventLog,
        policies: PolicyStore,
        *,
        clock: Callable[[], float] = time.time,
        policy_file: str | None = None,
        report_dir: str | Path | None = None,
        external_url: str = "",
    ) -> None:
        self.clock = clock
        self.policy_file = Path(policy_file) if policy_file else None
        self._file_stamp: tuple[float, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.runner = ThreadRunner()
        self.engine = PolicyEngine(
            store,
            events,
            policies,
            runner=self.runner,
            report_dir=report_dir,
            post=self._post,
            external_url=external_url,
        )

    def _post(self, fn: Callable[[], Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() == self._loop_thread:
            fn()
            return
        loop.call_soon_threadsafe(fn)

    def reload_file(self) -> None:
        """Read the policy file if it changed since last time (validated before use)."""
        if self.policy_file is None:
            return
        try:
            st = self.policy_file.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._file_stamp:
                return
            text = self.policy_file.read_text()
        except OSError as exc:
            if self._file_stamp != (0.0, -1):
                self._file_stamp = (0.0, -1)
                log.warning("cannot read the policy file %s: %s", self.policy_file, exc)
            return
        self._file_stamp = stamp
        self.engine.set_policy_text(text, f"file:{self.policy_file}")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.reload_file()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.reload_file()
                self.engine.evaluate(self.clock())
            except Exception:  # keep evaluating: the next round may succeed
                log.exception("policy evaluation failed")
            await asyncio.sleep(self.engine.interval())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.get_running_loop().run_in_executor(None, self.runner.wait_idle, 5.0)
        self.runner.close()
