"""Wait for a condition with a deadline: the one way tests here wait (never a bare
sleep for luck)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """fn()'s first truthy value, polled every 50 ms; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
