"""Where the policy engine's actions run: inline (tests, the CLI) or on a bounded pool
of worker threads (the control plane), one service's actions in decision order."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from goleash.control.actions import Action, ActionContext, Attempt, run_action

log = logging.getLogger("goleash.control.engine")

Report = Callable[[Attempt, ActionContext], None]


class InlineRunner:
    """Runs actions in the calling thread, one after another (tests, the CLI)."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sleep = sleep

    def submit(self, action: Action, ctx: ActionContext, report: Report) -> None:
        run_action(action, ctx, report, sleep=self._sleep)

    def wait_idle(self, timeout: float = 0.0) -> bool:
        return True

    def close(self) -> None:
        pass


Job = tuple[Action, ActionContext, Report]
DEFAULT_ACTION_WORKERS = 8


class ThreadRunner:
    """A bounded pool of worker threads; one service's actions run one at a time, in
    decision order (a recovery never overtakes the degrade it undoes). Services take
    turns: a worker runs one job of a service and puts the service back in line, so a
    webhook retrying for a minute holds one worker, not the others' decisions. The
    pool never grows past `workers`, however many services there are."""

    def __init__(self, workers: int = DEFAULT_ACTION_WORKERS) -> None:
        self.workers = workers
        self._jobs: dict[str, deque[Job]] = {}  # services with work queued or running
        self._ready: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._pending = 0
        self._lock = threading.Condition()

    def submit(self, action: Action, ctx: ActionContext, report: Report) -> None:
        with self._lock:
            self._pending += 1
            jobs = self._jobs.get(ctx.service)
            if jobs is None:
                self._jobs[ctx.service] = deque([(action, ctx, report)])
                self._ready.put(ctx.service)
            else:
                jobs.append((action, ctx, report))
            if len(self._threads) < min(self.workers, len(self._jobs)):
                th = threading.Thread(
                    target=self._work, name=f"goleash-actions-{len(self._threads)}", daemon=True
                )
                th.start()
                self._threads.append(th)

    def _work(self) -> None:
        while True:
            service = self._ready.get()
            if service is None:
                return
            with self._lock:
                action, ctx, report = self._jobs[service].popleft()
            try:
                run_action(action, ctx, report)
            except Exception:  # an action bug must not kill the worker
                log.exception("action %s for %s failed unexpectedly", action.type, service)
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._jobs[service]:
                        self._ready.put(service)  # its next job, after the others' turns
                    else:
                        del self._jobs[service]
                    self._lock.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        for _ in self._threads:
            self._ready.put(None)
        for th in self._threads:
            th.join(timeout=5.0)
