"""Where one rule stands for one service, and the steps of a transition that touch
only that state: counting a reading into each level's run, and the cooldown."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from goleash.control.engine_evidence import dur, fmt
from goleash.control.engine_signals import Reading
from goleash.control.rules import RuleSpec


@dataclass
class RuleState:
    """Where one rule stands for one service."""

    level: int = -1  # index into the rule's levels; -1: normal
    entered_at: float = 0.0
    applied: bool = False  # the current level's actions really ran (enforce mode)
    runs: list[int] = field(default_factory=list)  # consecutive evaluations at >= level i
    since: list[float | None] = field(default_factory=list)  # start of that run
    clear_since: float | None = None
    next_allowed: float = 0.0
    cooldown: float = 0.0  # the next cooldown to apply (0: the rule's initial)
    last_transition: float = float("-inf")
    note: str = ""  # the last hold reason recorded (recorded once, not every evaluation)
    history: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=4096))
    rhistory: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=4096))
    last_value: float | None = None

    def reset_runs(self, n: int) -> None:
        self.runs = [0] * n
        self.since = [None] * n


@dataclass(frozen=True)
class Decision:
    """A level change (or what it would have been, in monitor mode)."""

    event_id: int
    service: str
    rule: str
    direction: str  # DEGRADE / RECOVER
    from_level: str
    to_level: str
    mode: str
    reason: str
    forced: bool
    time: float
    actions: tuple[str, ...]


def sustained_level(rule: RuleSpec, st: RuleState, reading: Reading, now: float) -> int:
    """Count the reading into each level's run; the highest level held for the rule's
    sustain (-1: none)."""
    candidate = max((i for i, lv in enumerate(rule.levels) if lv.firing(reading.value)), default=-1)
    st.history.append((now, reading.raw, candidate >= 0))
    st.last_value = reading.value
    for i in range(len(rule.levels)):
        if i <= candidate:
            st.runs[i] += 1
            st.since[i] = st.since[i] if st.since[i] is not None else now
        else:
            st.runs[i], st.since[i] = 0, None
    sustained = -1
    for i in range(len(rule.levels)):
        since = st.since[i]
        held = (
            st.runs[i] >= rule.consecutive
            if rule.sustain_window <= 0
            else since is not None and now - since >= rule.sustain_window
        )
        if held:
            sustained = i
    return sustained


def sustain_text(rule: RuleSpec) -> str:
    if rule.sustain_window > 0:
        return dur(rule.sustain_window)
    return f"{rule.consecutive} evaluation{'s' if rule.consecutive != 1 else ''}"


def start_cooldown(rule: RuleSpec, st: RuleState, now: float) -> None:
    """Cooldown with backoff; a quiet period as long as the maximum resets it."""
    cd = rule.cooldown
    if st.cooldown <= 0 or now - st.last_transition >= cd.max:
        st.cooldown = cd.initial
    st.next_allowed = now + st.cooldown
    st.cooldown = min(st.cooldown * cd.backoff, cd.max)
    st.last_transition = now


def recovery_check(
    rule: RuleSpec, st: RuleState, reading: Reading | None, recovery: Reading | None
) -> tuple[Reading | None, bool, str]:
    """What recovery is judged on (the recovery signal's reading `recovery`, else the
    signal's `reading` against the level's clear threshold): the reading, whether it
    cleared, and why in words."""
    if rule.recovery_signal is not None:
        rr = recovery
        below = rule.recovery_signal.below
        assert below is not None
        clear_text = (
            f"{rule.recovery_signal.describe()} "
            f"{fmt(rr.value if rr else 0, rule.recovery_signal.unit)} < "
            f"{fmt(below, rule.recovery_signal.unit)}"
        )
        return rr, rr is not None and rr.value < below, clear_text
    lv = rule.levels[st.level]
    limit = lv.clear_below if lv.clear_below is not None else lv.above
    shown = fmt(reading.value if reading else 0, rule.signal.unit)
    clear_text = (
        f"{rule.signal.describe()} {shown}"
        f" {'<' if lv.clear_below is not None else '<='} {fmt(limit, rule.signal.unit)}"
    )
    return reading, reading is not None and lv.cleared(reading.value), clear_text
