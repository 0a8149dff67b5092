"""What the policy engine has done, counted for /metrics (and OTLP): decisions by
rule, direction and mode; action attempts and failures by action type and outcome;
how long evaluation rounds take. Plain counters behind a lock: actions report from
worker threads while a scrape reads on the event loop."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

# Evaluation rounds take ~0.1-100 ms; buckets 2x apart from 0.25 ms to 4 s.
EVAL_BOUNDS_S = tuple(0.00025 * (1 << k) for k in range(15))


@dataclass
class EngineCounts:
    """A consistent copy, taken under the lock."""

    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    attempts: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    rule_errors: int = 0
    evaluations: int = 0
    eval_sum_s: float = 0.0
    eval_buckets: list[int] = field(default_factory=lambda: [0] * len(EVAL_BOUNDS_S))


class EngineStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = EngineCounts()

    def evaluated(self, seconds: float, decisions: list[tuple[str, str, str]]) -> None:
        """One round took `seconds` and decided (rule, direction, mode) for each."""
        with self._lock:
            c = self._c
            c.evaluations += 1
            c.eval_sum_s += seconds
            for i, le in enumerate(EVAL_BOUNDS_S):
                if seconds <= le:
                    c.eval_buckets[i] += 1
                    break
            c.decisions.update(decisions)

    def rule_failed(self) -> None:
        with self._lock:
            self._c.rule_errors += 1

    def attempted(self, action: str, ok: bool, outcome: str) -> None:
        with self._lock:
            self._c.attempts[(action, outcome)] += 1
            if not ok:
                self._c.failures[(action, outcome)] += 1

    def snapshot(self) -> EngineCounts:
        with self._lock:
            c = self._c
            return EngineCounts(
                Counter(c.decisions), Counter(c.attempts), Counter(c.failures),
                c.rule_errors, c.evaluations, c.eval_sum_s, list(c.eval_buckets),
            )  # fmt: skip
