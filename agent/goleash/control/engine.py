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
tests on plain data; `engine_loop.EngineLoop` runs it on the control plane's event
loop. This module holds the decisions, one method per step of a transition; helpers:
`engine_signals` (reading a signal), `engine_state` (a rule's state per service,
sustain, cooldown), `engine_evidence` (evidence and flame graphs), `engine_records`
(the events' words), `engine_runners` (where actions run).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import engine_signals
from goleash.control.actions import DEGRADE, RECOVER, Action, ActionContext, Attempt
from goleash.control.engine_evidence import EvidenceSettings, dur, fmt, gather
from goleash.control.engine_evidence import histogram_text as histogram_text
from goleash.control.engine_records import attempt_record, decision_record
from goleash.control.engine_runners import DEFAULT_ACTION_WORKERS as DEFAULT_ACTION_WORKERS
from goleash.control.engine_runners import InlineRunner, ThreadRunner
from goleash.control.engine_signals import Reading
from goleash.control.engine_state import (
    Decision,
    RuleState,
    recovery_check,
    start_cooldown,
    sustain_text,
    sustained_level,
)
from goleash.control.engine_stats import EngineStats
from goleash.control.events import EventLog
from goleash.control.policy import PolicyError, PolicyStore, accept_policy, compile_policy
from goleash.control.rules import CompiledPolicy, RuleSpec, SignalSpec
from goleash.control.state import Store

log = logging.getLogger("goleash.control.engine")

PAUSE, FORCE_DEGRADE, FORCE_RECOVER = (
    q.OVERRIDE_ACTION_PAUSE_RULE,
    q.OVERRIDE_ACTION_FORCE_DEGRADE,
    q.OVERRIDE_ACTION_FORCE_RECOVER,
)


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
            return self._force(pol, rule, svc, st, forced[-1], now, n_services)
        reading = self.read(rule.signal, svc, now, st.history)
        if reading is not None:
            sustained = sustained_level(rule, st, reading, now)
            if sustained > st.level:
                lv = rule.levels[sustained]
                why = (
                    f"{rule.signal.describe()} {fmt(reading.value, rule.signal.unit)} > "
                    f"{fmt(lv.above, rule.signal.unit)} for {sustain_text(rule)}"
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
        return self._judge_recovery(pol, rule, svc, st, reading, now, n_services)

    def _force(
        self,
        pol: CompiledPolicy,
        rule: RuleSpec,
        svc: str,
        st: RuleState,
        o: Any,
        now: float,
        n_services: int,
    ) -> Decision | None:
        """A force-degrade or force-recover override: go to its level, evidence or not."""
        if o.action == FORCE_RECOVER:
            target = -1
        else:
            target = rule.level_index(o.level) if o.level else len(rule.levels) - 1
            if target < 0:
                target = len(rule.levels) - 1
        if target == st.level:
            return None
        why = f"manual override ({o.reason or 'no reason given'})"
        return self._transition(
            rule, svc, st, target, now, why, None, forced=True, mode=pol.mode, n_services=n_services
        )

    def _judge_recovery(
        self,
        pol: CompiledPolicy,
        rule: RuleSpec,
        svc: str,
        st: RuleState,
        reading: Reading | None,
        now: float,
        n_services: int,
    ) -> Decision | None:
        """A degraded service: step down once the signal has cleared for the hold time."""
        rsig = rule.recovery_signal
        recovery = self.read(rsig, svc, now, st.rhistory) if rsig is not None else None
        rreading, cleared, clear_text = recovery_check(rule, st, reading, recovery)
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
        why = f"{clear_text} for {dur(now - st.clear_since)} (hold {dur(rule.hold)})"
        return self._transition(
            rule, svc, st, target, now, why, rreading, mode=pol.mode, pol=pol, n_services=n_services
        )

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
        """Move the rule's level for a service to `target` (unless something says wait),
        record the DECISION with its evidence, and in enforce mode run the actions."""
        up = target > st.level
        if self._held_back(rule, svc, st, target, now, reason, forced, mode, pol, n_services):
            return None
        start_cooldown(rule, st, now)
        from_name = rule.levels[st.level].name if st.level >= 0 else ""
        to_name = rule.levels[target].name if target >= 0 else ""
        direction = DEGRADE if up else RECOVER
        enforce = mode == "enforce"
        jobs = self._jobs(rule, svc, st.level, target, enforce)
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
            degraded_since=st.entered_at if not up else now,
            evidence=self._evidence_or_error(rule, svc, now, reading, direction),
            kubernetes=engine_signals.kubernetes_ref(self.store, svc),
        )
        planned = []
        for a, _lvl in jobs:
            try:
                planned.append(f"{a.type} {a.describe(ctx0)}")
            except Exception as exc:  # an unknown target still makes a decision
                planned.append(f"{a.type} ({exc})")
        rec_id = self._record_decision(ctx0, forced, planned, jobs)
        st.level = target
        st.entered_at = now
        st.applied = enforce
        st.clear_since = None
        st.note = ""
        st.reset_runs(len(rule.levels))
        if enforce:
            ctx = ActionContext(**{**ctx0.__dict__, "decision_id": rec_id})
            for a, _lvl in jobs:
                self.runner.submit(a, ctx, self._report)
        return Decision(
            rec_id,
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

    def _held_back(
        self,
        rule: RuleSpec,
        svc: str,
        st: RuleState,
        target: int,
        now: float,
        reason: str,
        forced: bool,
        mode: str,
        pol: CompiledPolicy | None,
        n_services: int,
    ) -> bool:
        """Whether the mode, the cooldown or the blast-radius cap says wait (a hold is
        noted once); overrides skip the cooldown and the cap, never the mode."""
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
            return True
        if forced:
            return False
        if now < st.next_allowed:
            self._note(
                rule,
                svc,
                st,
                f"would {'degrade' if up else 'recover'} ({reason}) but the cooldown "
                f"runs {dur(st.next_allowed - now)} more",
                now,
                key=f"cooldown-{up}",
            )
            return True
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
                return True
        return False

    def _jobs(
        self, rule: RuleSpec, svc: str, level: int, target: int, enforce: bool
    ) -> list[tuple[Action, str]]:
        """Which actions this step runs: those of the levels entered (degrade) or left
        (recover). An action shared by rules (same key) runs when the first holder takes
        it and is undone when the last one lets go."""
        up = target > level
        steps = range(level + 1, target + 1) if up else range(level, target, -1)
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
        return jobs

    def _evidence_or_error(
        self, rule: RuleSpec, svc: str, now: float, reading: Reading | None, direction: str
    ) -> dict[str, Any]:
        try:
            return self.evidence(rule, svc, now, reading, direction)
        except Exception as exc:  # evidence explains a decision; it must not hold it
            log.exception("gathering evidence for %s (%s) failed", svc, rule.name)
            return {"signal": rule.signal.describe(), "error": f"{type(exc).__name__}: {exc}"}

    def _record_decision(
        self,
        ctx: ActionContext,
        forced: bool,
        planned: list[str],
        jobs: list[tuple[Action, str]],
    ) -> int:
        """The DECISION event (the id actions refer to)."""
        msg, details = decision_record(ctx, forced, planned, jobs)
        rec = self.events.append(t.EVENT_KIND_DECISION, msg, service=ctx.service, details=details)
        return rec.id

    def _report(self, a: Attempt, ctx: ActionContext) -> None:
        self.stats.attempted(a.action, a.ok, a.outcome)
        msg, details = attempt_record(a, ctx)
        self._post(
            lambda: self.events.append(
                t.EVENT_KIND_ACTION, msg, service=ctx.service, details=details
            )
        )

    # --- reading signals and evidence (engine_signals, engine_evidence) -------------

    def read(
        self,
        sig: SignalSpec,
        svc: str,
        now: float,
        history: deque[tuple[float, float, bool]] | None = None,
    ) -> Reading | None:
        """The signal's value for a service now; None when there is no data to judge on."""
        return engine_signals.read(self.store, sig, svc, now, history)

    def evidence(
        self, rule: RuleSpec, svc: str, now: float, reading: Reading | None, direction: str
    ) -> dict[str, Any]:
        """What the decision rests on, for the event log, alerts and commands."""
        settings = EvidenceSettings(self.report_dir, self.external_url)
        return gather(self.store, settings, rule, svc, now, reading, direction)


def check_policy_text(text: str) -> CompiledPolicy:
    """Validate a policy the way the control plane will (for `goleash policy check`)."""
    return compile_policy(text)[1]
