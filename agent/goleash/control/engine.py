"""The policy engine: signals -> sustained levels -> decisions -> actions, and back.

Every evaluation reads each rule's signal per service from the Store's query methods
(the same numbers the API serves), and moves the rule's level for that service:

- up, when a level's threshold has held for the rule's sustain (N consecutive
  evaluations, or a duration), unless the cooldown or the blast-radius cap says
  wait;
- down, when the signal (or the rule's recovery signal) has stayed under the
  current level's clear threshold for the hold time, unless the cooldown says wait.

No data (no running process, a stale agent, nothing traced in the window) holds the
current state: the engine never acts on missing evidence. Each change is a DECISION
event carrying the evidence (reading, busiest creation sites, orphans, leak
suspects, latency histograms, a flame graph of the creation stacks); in enforce mode
the level's actions then run (each attempt an ACTION event), in monitor mode the
decision says what would have run. Manual overrides (pause a rule, force degrade,
force recover) come from the PolicyStore.

The engine itself is synchronous and takes time as an argument, so it runs in unit
tests on plain data; `EngineLoop` runs it on the control plane's event loop and the
actions on worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goleash import profiles
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import flamegraph
from goleash.control.actions import (
    DEGRADE,
    RECOVER,
    Action,
    ActionContext,
    Attempt,
    run_action,
)
from goleash.control.engine_stats import EngineStats
from goleash.control.events import EventLog
from goleash.control.histogram import bucket_bounds
from goleash.control.policy import PolicyError, PolicyStore, accept_policy, compile_policy
from goleash.control.rules import CompiledPolicy, RuleSpec, SignalSpec
from goleash.control.state import ControlError, Store

log = logging.getLogger("goleash.control.engine")

PAUSE, FORCE_DEGRADE, FORCE_RECOVER = (
    q.OVERRIDE_ACTION_PAUSE_RULE,
    q.OVERRIDE_ACTION_FORCE_DEGRADE,
    q.OVERRIDE_ACTION_FORCE_RECOVER,
)
MIN_BASELINE_SAMPLES = 3
EVIDENCE_SITES = 10


@dataclass(frozen=True)
class Reading:
    """One evaluation of a signal for a service."""

    value: float  # what thresholds compare against (a rise over baseline for those signals)
    raw: float  # the measured value itself
    baseline: float | None = None
    processes: int = 0
    note: str = ""


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


# --- action runners --------------------------------------------------------------------


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


# --- signals -----------------------------------------------------------------------------


def _selector(service: str) -> q.ProcessSelector:
    return q.ProcessSelector(service=service)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:80]


class PolicyEngine:
    """Evaluates the running policy against the Store and records what it decides."""

    def __init__(
        self,
        store: Store,
        events: EventLog,
        policies: PolicyStore,
        *,
        runner: InlineRunner | ThreadRunner | None = None,
        report_dir: str | Path | None = None,
        post: Callable[[Callable[[], Any]], Any] | None = None,
        external_url: str = "",
    ) -> None:
        self.store = store
        self.events = events
        self.policies = policies
        self.runner = runner or InlineRunner()
        self.report_dir = Path(report_dir) if report_dir else None
        self.external_url = external_url
        # How worker threads hand event-log writes to the thread that owns the Store
        # and the watchers (the event loop); direct calls when there is no loop.
        self._post = post or (lambda fn: fn())
        self.states: dict[tuple[str, str], RuleState] = {}
        self.holders: dict[str, set[tuple[str, str]]] = {}  # action key -> (rule, level)
        self.policy: CompiledPolicy | None = None
        self._mode = ""
        self._restored = False
        self.stats = EngineStats()  # for /metrics

    # --- policy ----------------------------------------------------------------------

    def set_policy_text(self, text: str, source: str) -> bool:
        """Validate and run `text` (from a file or a tool); log the outcome. False when
        rejected (the running policy stays)."""
        cur = self.policies.current
        if cur is not None and cur.document.text == text:
            return True
        try:
            accept_policy(self.policies, self.events, text, source)
        except PolicyError:
            return False
        return True

    def _current(self, now: float) -> CompiledPolicy | None:
        cur = self.policies.current
        if cur is None:
            return None
        if self.policy is None or self.policy.version != cur.version:
            self._switch(cur.compiled, now)  # compiled once, when the text was accepted
        return self.policy

    def _switch(self, new: CompiledPolicy, now: float) -> None:
        """A new policy: keep the state of rules that stay; undo what removed rules did."""
        old, self.policy = self.policy, new
        if not self._restored:
            self._restore(new)
        if old is None:
            self._mode = new.mode
            return
        by_name = {r.name: r for r in new.rules}
        old_rules = {r.name: r for r in old.rules}
        for (rname, svc), st in list(self.states.items()):
            rule = by_name.get(rname)
            before = old_rules.get(rname)
            same_levels = (
                rule is not None
                and before is not None
                and [lv.name for lv in rule.levels] == [lv.name for lv in before.levels]
            )
            if st.level >= 0 and not same_levels and before is not None:
                self._transition(
                    before,
                    svc,
                    st,
                    -1,
                    now,
                    "the rule was removed or its levels changed",
                    None,
                    forced=True,
                    mode="enforce" if st.applied else "monitor",
                )
            if rule is None:
                del self.states[(rname, svc)]
        if new.mode != self._mode:
            self._mode_change(new.mode, now)

    def _mode_change(self, mode: str, now: float) -> None:
        """Levels reached in monitor mode were never applied: enforce starts from normal
        (and re-earns them with real evidence). Applied levels stay applied in monitor
        and off: those modes never act, undoing included."""
        for st in self.states.values():
            if st.level >= 0 and not st.applied and mode == "enforce":
                st.level = -1
                st.reset_runs(len(st.runs))
                st.clear_since = None
        self._mode = mode

    def _restore(self, policy: CompiledPolicy) -> None:
        """Levels applied before a restart of the control plane, from the event log, so
        a degraded service is still recovered after one."""
        self._restored = True
        rules = {r.name: r for r in policy.rules}
        last: dict[tuple[str, str], dict[str, Any]] = {}
        for e in self.events.iter_kinds((t.EVENT_KIND_DECISION,)):
            d = e.details
            if "rule" in d and "to_level" in d:
                last[(str(d["rule"]), e.service)] = {**d, "_time": e.time}
        for (rname, svc), d in last.items():
            rule = rules.get(rname)
            if rule is None or not d.get("applied") or not d.get("to_level"):
                continue
            idx = rule.level_index(str(d["to_level"]))
            if idx < 0:
                continue
            st = self._state(rule, svc)
            st.level, st.applied, st.entered_at = idx, True, float(d["_time"])
            for lv in rule.levels[: idx + 1]:
                for a in lv.actions:
                    if a.key(svc):
                        self.holders.setdefault(a.key(svc), set()).add((rname, lv.name))

    # --- evaluation ------------------------------------------------------------------

    def interval(self) -> float:
        return self.policy.interval if self.policy else 10.0

    def _state(self, rule: RuleSpec, service: str) -> RuleState:
        st = self.states.get((rule.name, service))
        if st is None:
            st = self.states[(rule.name, service)] = RuleState()
            st.reset_runs(len(rule.levels))
        if len(st.runs) != len(rule.levels):
            st.reset_runs(len(rule.levels))
        return st

    def services(self) -> list[str]:
        """Services with at least one followed process (gone ones are not judged)."""
        return sorted(name for name, svc in self.store.services.items() if svc.procs)

    def evaluate(self, now: float) -> list[Decision]:
        """One round over every rule and service; returns the decisions taken."""
        pol = self._current(now)
        if pol is None or pol.mode == "off":
            return []
        started = time.perf_counter()
        decisions: list[Decision] = []
        overrides = self.policies.active_overrides()
        services = self.services()
        for rule in pol.rules:
            for svc in services:
                if not rule.applies_to(svc):
                    continue
                try:
                    d = self._evaluate_one(pol, rule, svc, now, overrides, len(services))
                except Exception:  # one rule or service must not stop the others
                    log.exception("evaluating %s for %s failed; holding", rule.name, svc)
                    self.stats.rule_failed()
                    continue
                if d is not None:
                    decisions.append(d)
        self.stats.evaluated(
            time.perf_counter() - started, [(d.rule, d.direction, d.mode) for d in decisions]
        )
        return decisions

    def _evaluate_one(
        self,
        pol: CompiledPolicy,
        rule: RuleSpec,
        svc: str,
        now: float,
        overrides: Iterable[Any],
        n_services: int,
    ) -> Decision | None:
        st = self._state(rule, svc)
        mine = [o for o in overrides if o.service == svc and (not o.rule or o.rule == rule.name)]
        if any(o.action == PAUSE and o.rule == rule.name for o in mine):
            self._note(rule, svc, st, "paused by an override", now)
            return None
        if st.note == "paused by an override":
            st.note = ""  # resumed: a later pause is news again
        forced = [o for o in mine if o.action in (FORCE_DEGRADE, FORCE_RECOVER)]
        if forced:
            o = forced[-1]
            if o.action == FORCE_RECOVER:
                target = -1
            else:
                target = rule.level_index(o.level) if o.level else len(rule.levels) - 1
                if target < 0:
                    target = len(rule.levels) - 1
            if target != st.level:
                why = f"manual override ({o.reason or 'no reason given'})"
                return self._transition(
                    rule,
                    svc,
                    st,
                    target,
                    now,
                    why,
                    None,
                    forced=True,
                    mode=pol.mode,
                    n_services=n_services,
                )
            return None
        reading = self.read(rule.signal, svc, now, st.history)
        sustained = -1
        if reading is not None:
            candidate = max(
                (i for i, lv in enumerate(rule.levels) if lv.firing(reading.value)), default=-1
            )
            st.history.append((now, reading.raw, candidate >= 0))
            st.last_value = reading.value
            for i in range(len(rule.levels)):
                if i <= candidate:
                    st.runs[i] += 1
                    st.since[i] = st.since[i] if st.since[i] is not None else now
                else:
                    st.runs[i], st.since[i] = 0, None
            for i in range(len(rule.levels)):
                since = st.since[i]
                held = (
                    st.runs[i] >= rule.consecutive
                    if rule.sustain_window <= 0
                    else since is not None and now - since >= rule.sustain_window
                )
                if held:
                    sustained = i
            if sustained > st.level:
                lv = rule.levels[sustained]
                why = (
                    f"{rule.signal.describe()} {_fmt(reading.value, rule.signal.unit)} > "
                    f"{_fmt(lv.above, rule.signal.unit)} for {self._sustain_text(rule)}"
                )
                return self._transition(
                    rule,
                    svc,
                    st,
                    sustained,
                    now,
                    why,
                    reading,
                    mode=pol.mode,
                    pol=pol,
                    n_services=n_services,
                )
        if st.level < 0:
            if reading is None:
                self._note(rule, svc, st, "no data: holding", now)
            elif st.note.startswith("no data"):
                st.note = ""  # data is back: a later gap is news again
            return None
        # degraded: judge recovery
        if rule.recovery_signal is not None:
            rr = self.read(rule.recovery_signal, svc, now, st.rhistory)
            below = rule.recovery_signal.below
            assert below is not None
            cleared = rr is not None and rr.value < below
            rreading = rr
            clear_text = (
                f"{rule.recovery_signal.describe()} "
                f"{_fmt(rr.value if rr else 0, rule.recovery_signal.unit)} < "
                f"{_fmt(below, rule.recovery_signal.unit)}"
            )
        else:
            rreading = reading
            lv = rule.levels[st.level]
            cleared = reading is not None and lv.cleared(reading.value)
            limit = lv.clear_below if lv.clear_below is not None else lv.above
            shown = _fmt(reading.value if reading else 0, rule.signal.unit)
            clear_text = (
                f"{rule.signal.describe()} {shown}"
                f" {'<' if lv.clear_below is not None else '<='} {_fmt(limit, rule.signal.unit)}"
            )
        if rreading is None:
            st.clear_since = None
            self._note(rule, svc, st, "no data: holding the degraded state", now)
            return None
        if not cleared:
            st.clear_since = None
            if st.note.startswith("no data"):
                st.note = ""
            return None
        if st.clear_since is None:
            st.clear_since = now
        if now - st.clear_since < rule.hold:
            return None
        target = -1
        if rule.recovery_signal is None and reading is not None:
            # step down to the highest level the signal has not cleared yet
            target = max(
                (i for i in range(st.level) if not rule.levels[i].cleared(reading.value)),
                default=-1,
            )
        why = f"{clear_text} for {_dur(now - st.clear_since)} (hold {_dur(rule.hold)})"
        return self._transition(
            rule, svc, st, target, now, why, rreading, mode=pol.mode, pol=pol, n_services=n_services
        )

    @staticmethod
    def _sustain_text(rule: RuleSpec) -> str:
        if rule.sustain_window > 0:
            return _dur(rule.sustain_window)
        return f"{rule.consecutive} evaluation{'s' if rule.consecutive != 1 else ''}"

    def _note(
        self, rule: RuleSpec, svc: str, st: RuleState, note: str, now: float, key: str = ""
    ) -> None:
        """Record a hold once (not at every evaluation) as a DECISION without a change;
        `key` says which notes are the same hold (their text carries changing numbers)."""
        key = key or note
        if st.note == key:
            return
        st.note = key
        self.events.append(
            t.EVENT_KIND_DECISION,
            f"{svc}: {rule.name}: {note}",
            service=svc,
            details={
                "decision": "hold",
                "rule": rule.name,
                "level": rule.levels[st.level].name if st.level >= 0 else "",
                "reason": note,
            },
        )

    def _degraded_services(self) -> set[str]:
        out = set()
        for (rname, svc), st in self.states.items():
            rule = self._rule(rname)
            if rule is not None and st.level >= 0 and rule.levels[st.level].degrades:
                out.add(svc)
        return out

    def _rule(self, name: str) -> RuleSpec | None:
        if self.policy is None:
            return None
        for r in self.policy.rules:
            if r.name == name:
                return r
        return None

    def _transition(
        self,
        rule: RuleSpec,
        svc: str,
        st: RuleState,
        target: int,
        now: float,
        reason: str,
        reading: Reading | None,
        *,
        forced: bool = False,
        mode: str,
        pol: CompiledPolicy | None = None,
        n_services: int = 0,
    ) -> Decision | None:
        up = target > st.level
        if mode != "enforce" and st.applied:
            self._note(
                rule,
                svc,
                st,
                f"would {'degrade' if up else 'recover'} ({reason}); {mode} mode leaves the "
                "level applied in enforce mode as it is",
                now,
                key=f"{mode}-keeps-{up}",
            )
            return None
        if not forced:
            if now < st.next_allowed:
                self._note(
                    rule,
                    svc,
                    st,
                    f"would {'degrade' if up else 'recover'} ({reason}) but the cooldown "
                    f"runs {_dur(st.next_allowed - now)} more",
                    now,
                    key=f"cooldown-{up}",
                )
                return None
            if (
                up
                and pol is not None
                and rule.levels[target].degrades
                and not (st.level >= 0 and rule.levels[st.level].degrades)
            ):
                cap = pol.allowed_degraded(n_services)
                degraded = self._degraded_services()
                if cap is not None and svc not in degraded and len(degraded) >= cap:
                    self._note(
                        rule,
                        svc,
                        st,
                        f"would degrade ({reason}) but {len(degraded)} of {n_services} "
                        f"services are degraded already (blast radius: at most {cap})",
                        now,
                        key="blast-radius",
                    )
                    return None
        # cooldown with backoff; a quiet period as long as the maximum resets it
        cd = rule.cooldown
        if st.cooldown <= 0 or now - st.last_transition >= cd.max:
            st.cooldown = cd.initial
        st.next_allowed = now + st.cooldown
        st.cooldown = min(st.cooldown * cd.backoff, cd.max)
        st.last_transition = now
        from_name = rule.levels[st.level].name if st.level >= 0 else ""
        to_name = rule.levels[target].name if target >= 0 else ""
        direction = DEGRADE if up else RECOVER
        degraded_since = st.entered_at if not up else now
        enforce = mode == "enforce"
        # which actions this step runs: levels entered (degrade) or left (recover)
        steps = range(st.level + 1, target + 1) if up else range(st.level, target, -1)
        jobs: list[tuple[Action, str]] = []
        for i in steps:
            lv = rule.levels[i]
            for a in lv.actions:
                key = a.key(svc)
                holders = self.holders.setdefault(key, set()) if key else set()
                if not key:
                    jobs.append((a, lv.name))
                    continue
                if up:
                    first = not holders
                    if enforce:
                        holders.add((rule.name, lv.name))
                    if first:
                        jobs.append((a, lv.name))
                else:
                    if enforce:
                        holders.discard((rule.name, lv.name))
                    if not holders - {(rule.name, lv.name)}:
                        jobs.append((a, lv.name))
        try:
            evidence = self.evidence(rule, svc, now, reading, direction)
        except Exception as exc:  # evidence explains a decision; it must not hold it
            log.exception("gathering evidence for %s (%s) failed", svc, rule.name)
            evidence = {"signal": rule.signal.describe(), "error": f"{type(exc).__name__}: {exc}"}
        k8s = self._kubernetes_ref(svc)
        ctx0 = ActionContext(
            decision_id=0,
            direction=direction,
            service=svc,
            rule=rule.name,
            level=to_name if up else from_name,
            from_level=from_name,
            to_level=to_name,
            reason=reason,
            mode=mode,
            time=now,
            degraded_since=degraded_since,
            evidence=evidence,
            kubernetes=k8s,
        )
        planned = []
        for a, _lvl in jobs:
            try:
                planned.append(f"{a.type} {a.describe(ctx0)}")
            except Exception as exc:  # an unknown target still makes a decision
                planned.append(f"{a.type} ({exc})")
        verb = "degrade" if up else "recover"
        prefix = "" if enforce else "monitor: would "
        msg = (
            f"{svc}: {prefix}{verb} {from_name or 'normal'} -> {to_name or 'normal'} "
            f"({rule.name}: {reason})"
        )
        rec = self.events.append(
            t.EVENT_KIND_DECISION,
            msg,
            service=svc,
            details={
                "decision": direction,
                "rule": rule.name,
                "from_level": from_name,
                "to_level": to_name,
                "mode": mode,
                "dry_run": not enforce,
                "applied": enforce,
                "forced": forced,
                "reason": reason,
                "actions": planned,
                "http2": "off" if up and any(a.type != "event" for a, _ in jobs) else "",
                "evidence": evidence,
            },
        )
        st.level = target
        st.entered_at = now
        st.applied = enforce
        st.clear_since = None
        st.note = ""
        st.reset_runs(len(rule.levels))
        if enforce:
            ctx = ActionContext(**{**ctx0.__dict__, "decision_id": rec.id})
            for a, _lvl in jobs:
                self.runner.submit(a, ctx, self._report)
        return Decision(
            rec.id,
            svc,
            rule.name,
            direction,
            from_name,
            to_name,
            mode,
            reason,
            forced,
            now,
            tuple(planned),
        )

    def _report(self, a: Attempt, ctx: ActionContext) -> None:
        self.stats.attempted(a.action, a.ok, a.outcome)
        ok = "ok" if a.ok else a.outcome
        msg = (
            f"{ctx.service}: {a.action} {a.operation} {a.target} "
            f"(attempt {a.attempt}/{a.attempts}, {ctx.direction} {ctx.rule}): "
            f"{a.outcome if a.ok else ok + ': ' + a.error}"
        )
        details = {
            "decision_id": ctx.decision_id,
            "decision": ctx.direction,
            "rule": ctx.rule,
            "level": ctx.level,
            "action": a.action,
            "operation": a.operation,
            "target": a.target,
            "attempt": a.attempt,
            "attempts": a.attempts,
            "ok": a.ok,
            "outcome": a.outcome,
            "error": a.error,
            "retry_in_seconds": a.retry_in,
            "duration_seconds": a.duration,
            "evidence": ctx.evidence,
        }
        self._post(
            lambda: self.events.append(
                t.EVENT_KIND_ACTION, msg, service=ctx.service, details=details
            )
        )

    # --- reading signals ---------------------------------------------------------------

    def _running(self, svc: str, window: float, now: float) -> list[q.ProcessStatus] | None:
        """The service's processes, or None when any of them is stale (hold)."""
        try:
            resp = self.store.list_processes(
                q.ListProcessesRequest(selector=_selector(svc), window_seconds=window), now
            )
        except ControlError:
            return None
        procs = list(resp.processes)
        if not procs or any(p.state != q.PROCESS_STATE_RUNNING for p in procs):
            return None
        return procs

    def read(
        self,
        sig: SignalSpec,
        svc: str,
        now: float,
        history: deque[tuple[float, float, bool]] | None = None,
    ) -> Reading | None:
        """The signal's value for a service now; None when there is no data to judge on."""
        window = min(sig.window, self.store.retention)
        procs = self._running(svc, window, now)
        if procs is None:
            return None
        n = len(procs)
        if sig.kind == "goroutines":
            if sig.scope == "service":
                v = float(sum(p.goroutines for p in procs))
            elif sig.scope == "process":
                v = float(max(p.goroutines for p in procs))
            else:
                v = float(self._site_live(svc, sig.site, now))
            return Reading(v, v, processes=n)
        if sig.kind == "orphans":
            if sig.scope == "site":
                v = float(self._site_orphans(svc, sig.site, now))
            elif sig.scope == "process":
                v = float(max(p.orphans for p in procs))
            else:
                v = float(sum(p.orphans for p in procs))
            if sig.growth_per_minute is None:
                return Reading(v, v, processes=n)
            pts = [(t0, x) for t0, x, _ in (history or ()) if t0 >= now - sig.window]
            pts.append((now, v))
            span = pts[-1][0] - pts[0][0]
            if span < sig.window / 2:
                return None  # not enough history to tell a growth
            g = (pts[-1][1] - pts[0][1]) / span * 60.0
            return Reading(g, v, processes=n, note=f"{v:g} orphans now")
        if sig.kind == "leak_suspects":
            resp = self.store.leak_suspects(q.ListLeakSuspectsRequest(selector=_selector(svc)), now)
            v = float(len(resp.suspects))
            return Reading(v, v, processes=n)
        if sig.kind == "panics":
            v = float(sum(p.panics for p in procs)) / window * 60.0
            return Reading(v, v, processes=n)
        # function_latency
        fn = self._function(svc, sig.function)
        if fn is None:
            return None
        try:
            lat = self.store.function_latency(
                q.GetFunctionLatencyRequest(
                    function=fn,
                    selector=_selector(svc),
                    window_seconds=window,
                    quantiles=[sig.quantile],
                ),
                now,
            )
        except ControlError:
            return None
        if not lat.count:
            return None
        v = lat.quantiles[0].value_seconds
        if sig.over_baseline is None:
            return Reading(v, v, processes=n, note=f"{lat.count} calls")
        # baseline: the median of this signal while it was not firing, so a sustained
        # jump does not become the new normal
        past = [
            x
            for t0, x, firing in (history or ())
            if not firing and now - sig.baseline_window <= t0 < now
        ]
        if len(past) < MIN_BASELINE_SAMPLES:
            # learning the baseline: keep the value, judge nothing yet
            if history is not None:
                history.append((now, v, False))
            return None
        base = statistics.median(past)
        return Reading(v - base, v, baseline=base, processes=n, note=f"{lat.count} calls")

    def _function(self, svc: str, pattern: str) -> str | None:
        """The traced function a signal names: exactly, or by a glob (`*` any run, `(*`
        a pointer receiver), so one policy covers releases where net/http's HTTP/2
        framer has another package path (`*http2*Framer).ReadFrame`)."""
        s = self.store.services.get(svc)
        if s is None:
            return None
        if pattern in s.latency or "*" not in pattern.replace("(*", "("):
            return pattern
        rx = re.compile(
            "".join(
                r"\(\*" if pattern[i : i + 2] == "(*" else ".*" if ch == "*" else re.escape(ch)
                for i, ch in enumerate(pattern)
                if not (ch == "*" and i and pattern[i - 1] == "(")
            )
        )
        return next((f for f in sorted(s.latency) if rx.fullmatch(f)), None)

    def _site_live(self, svc: str, site: str, now: float) -> int:
        resp = self.store.goroutine_summary(
            q.GetGoroutineSummaryRequest(selector=_selector(svc)), now
        )
        vals = [s.live for s in resp.sites if not site or _site_is(s, site)]
        return max(vals, default=0)

    def _site_orphans(self, svc: str, site: str, now: float) -> int:
        resp = self.store.list_orphans(q.ListOrphansRequest(selector=_selector(svc)), now)
        vals = [g.count for g in resp.groups if not site or _site_is(g, site)]
        return max(vals, default=0)

    def _kubernetes_ref(self, svc: str) -> dict[str, str]:
        s = self.store.services.get(svc)
        for key in sorted(s.procs) if s else ():
            p = self.store.procs.get(key)
            k = p.info.kubernetes if p else None
            if k is not None and k.workload_name:
                return {
                    "namespace": k.namespace,
                    "workload_kind": k.workload_kind,
                    "workload_name": k.workload_name,
                    "container": k.container,
                }
        return {}

    # --- evidence ------------------------------------------------------------------------

    def evidence(
        self, rule: RuleSpec, svc: str, now: float, reading: Reading | None, direction: str
    ) -> dict[str, Any]:
        """What the decision rests on, for the event log, alerts and commands."""
        ev: dict[str, Any] = {"signal": rule.signal.describe()}
        if reading is not None:
            ev["value"] = reading.value
            ev["measured"] = reading.raw
            if reading.baseline is not None:
                ev["baseline"] = reading.baseline
            if reading.note:
                ev["note"] = reading.note
        sel = _selector(svc)
        try:
            procs = self.store.list_processes(q.ListProcessesRequest(selector=sel), now)
            ev["processes"] = [
                {
                    "pid": p.info.pid,
                    "agent_id": p.agent_id,
                    "goroutines": p.goroutines,
                    "orphans": p.orphans,
                    "go_version": p.info.go_version,
                }
                for p in procs.processes
            ]
            ev["goroutines"] = sum(p.goroutines for p in procs.processes)
            summary = self.store.goroutine_summary(
                q.GetGoroutineSummaryRequest(selector=sel, limit=EVIDENCE_SITES), now
            )
            ev["sites"] = [
                {
                    "function": s.function,
                    "go_statement": s.go_statement,
                    "creator": s.creator_function,
                    "live": s.live,
                    "growth_per_minute": round(s.growth_per_minute, 1),
                    "oldest_age_seconds": round(s.age.max_seconds, 1),
                    "orphans": s.orphans,
                    "wait_reason": s.wait_reasons[0].reason if s.wait_reasons else "",
                }
                for s in summary.sites
            ]
            orphans = self.store.list_orphans(q.ListOrphansRequest(selector=sel), now)
            ev["orphans"] = [
                {
                    "function": g.function,
                    "go_statement": g.go_statement,
                    "creator": g.creator_function,
                    "count": g.count,
                    "oldest_age_seconds": round(g.oldest_age_seconds, 1),
                    "reason": g.reason,
                }
                for g in orphans.groups[:EVIDENCE_SITES]
            ]
            suspects = self.store.leak_suspects(q.ListLeakSuspectsRequest(selector=sel), now)
            ev["leak_suspects"] = [
                {
                    "function": s.function,
                    "go_statement": s.go_statement,
                    "live": s.live,
                    "growth_per_minute": round(s.growth_per_minute, 1),
                    "oldest_age_seconds": round(s.oldest_age_seconds, 1),
                }
                for s in suspects.suspects[:EVIDENCE_SITES]
            ]
            ev["latency"], text = self._latency(svc, now)
            if text:
                ev["latency_histogram_text"] = text
            if self.external_url:
                ev["links"] = {"control_plane": self.external_url}
            if direction == DEGRADE and self.report_dir is not None:
                svg = self._flamegraph(svc, summary, now, rule)
                if svg:
                    # the files, not their contents: alerts link to them
                    files = {
                        "flamegraph_svg": svg,
                        "flamegraph_folded": str(Path(svg).with_suffix(".folded")),
                        "goroutines_pprof": str(Path(svg).with_suffix(".pb.gz")),
                    }
                    ev.update(files)
                    if self.external_url:  # where the control plane serves report_dir
                        base = self.external_url.rstrip("/") + "/evidence/"
                        ev["links"].update({k: base + Path(v).name for k, v in files.items()})
        except ControlError as exc:  # the service vanished between reading and deciding
            ev["error"] = str(exc)
        return ev

    def _latency(self, svc: str, now: float) -> tuple[list[dict[str, Any]], str]:
        s = self.store.services.get(svc)
        out, lines = [], []
        for fn in sorted(s.latency) if s else ():
            try:
                lat = self.store.function_latency(
                    q.GetFunctionLatencyRequest(function=fn, selector=_selector(svc)), now
                )
            except ControlError:
                continue
            if not lat.count:
                continue
            rows = [
                (bucket_bounds(b.index, lat.histogram.sub_bucket_bits), b.count)
                for b in sorted(lat.histogram.buckets, key=lambda b: b.index)
            ]
            qs = {f"p{str(x.quantile)[2:].ljust(2, '0')}": x.value_seconds for x in lat.quantiles}
            out.append(
                {
                    "function": fn,
                    "window_seconds": lat.window_seconds,
                    "count": lat.count,
                    "mean_seconds": lat.mean_seconds,
                    "quantiles_seconds": qs,
                    "histogram": [[lo * 1e-9, hi * 1e-9, c] for (lo, hi), c in rows],
                }
            )
            lines.append(histogram_text(fn, lat.count, qs, rows))
        return out, "\n".join(lines)

    def _flamegraph(
        self, svc: str, summary: q.GetGoroutineSummaryResponse, now: float, rule: RuleSpec
    ) -> str:
        assert self.report_dir is not None
        sites = [(s.creator_function, s.go_statement, s.function, s.live) for s in summary.sites]
        kept = self.store.list_goroutines(
            q.ListGoroutinesRequest(selector=_selector(svc), page_size=1000), now
        )
        examples: dict[tuple[str, str], t.Goroutine] = {}
        for r in kept.goroutines:  # oldest first: keep the oldest of each site
            examples.setdefault((r.goroutine.function, r.goroutine.go_statement), r.goroutine)
        stacks = flamegraph.creation_stacks(sites, examples)
        if not stacks:
            return ""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        path = self.report_dir / f"{stamp}-{_safe_name(svc)}-{_safe_name(rule.name)}.svg"
        try:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            title = f"{svc}: goroutines by creation site ({rule.name})"
            path.write_text(flamegraph.render_svg(stacks, title))
            folded = path.with_suffix(".folded")
            folded.write_text(
                "".join(flamegraph.folded_line(f, n) + "\n" for f, n in stacks.items())
            )
            path.with_suffix(".pb.gz").write_bytes(
                profiles.pprof_goroutine_profile(
                    profiles.samples_from_folded(stacks), time_ns=int(now * 1e9), comments=[title]
                )
            )
        except OSError as exc:
            log.warning("cannot write the flame graph %s: %s", path, exc)
            return ""
        return str(path)


def _site_is(s: Any, site: str) -> bool:
    return s.function == site or s.go_statement == site or s.go_statement.endswith("/" + site)


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1e3:.0f}ms" if abs(v) < 10 else f"{v:.1f}s"
    if unit == "/min":
        return f"{v:.1f}/min"
    return f"{v:g}"


def _dur(s: float) -> str:
    s = max(s, 0.0)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def histogram_text(
    fn: str, count: int, qs: dict[str, float], rows: list[tuple[tuple[int, int], int]]
) -> str:
    """A latency histogram as text, one bar per bucket (alerts, terminals)."""
    head = ", ".join(f"{k} {_fmt(v, 's')}" for k, v in qs.items())
    lines = [f"{fn}: {count} calls, {head}"]
    top = max((c for _, c in rows), default=0)
    for (lo, hi), c in rows:
        bar = "#" * max(1, round(30 * c / top)) if top else ""
        lines.append(f"  {_ns(lo):>9} .. {_ns(hi):<9} {c:>8} {bar}")
    return "\n".join(lines)


def _ns(v: int) -> str:
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v}ns"


# --- running it in the control plane ---------------------------------------------------------


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


def check_policy_text(text: str) -> CompiledPolicy:
    """Validate a policy the way the control plane will (for `goleash policy check`)."""
    return compile_policy(text)[1]
