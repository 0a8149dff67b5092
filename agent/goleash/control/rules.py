"""A policy's rules, compiled: what the engine evaluates, checked key by key.

`compile_document` turns a policy that passed `policytext.parse_policy`'s top-level
checks into typed rules, and rejects anything the engine could not run with the line
of the offending YAML node and the reason (a typo in a threshold must not become a
rule that silently never fires). The grammar, with defaults:

    mode: monitor                      # enforce | monitor | off
    evaluation_interval: 10s
    defaults: {on_no_data: hold}       # the only choice: no data never acts
    blast_radius: {max_services: 3, max_percent: 20}
    cooldown: {initial: 5m, backoff: 2, max: 1h}     # default of every rule
    levels: [...]                      # default levels of goroutine rules
    actions: {name: {type: ...}}       # named actions, used by name in levels
    rules:
      - name: ...
        services: ["*"]                # service names or globs
        signal:
          kind: goroutines | orphans | leak_suspects | function_latency | panics
          scope: service | process | site            # goroutines, orphans
          site: "main.go:42" | main.worker           # scope site: only this site
          function: net/http.(*http2Framer).ReadFrame  # function_latency
          quantile: p99                              # p50 p90 p99 p999 or 0..1
          window: 30s                                # data one reading covers
          above: 300ms | 3000                        # the signal's own threshold
          over_baseline: 300ms                       # ... or its rise over a baseline
          baseline_window: 5m
          growth_per_minute: 50                      # orphans: growth, not count
        sustain: {consecutive: 3} | {window: 2m}
        levels:
          - level: L1
            above: 3000                # default: the signal's threshold
            clear_below: 2500          # default: not above
            actions: [{type: event}]
        recovery:
          hold: 10m
          signal: {kind: ..., below: 150ms}  # judge recovery on another signal
        cooldown: {initial: 5m, backoff: 2, max: 1h}
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from goleash.control.actions import Action, ActionSpecError, build_action
from goleash.control.policytext import PolicyDocument, PolicyError

SIGNAL_KINDS = ("goroutines", "orphans", "leak_suspects", "function_latency", "panics")
SCOPES = ("service", "process", "site")
QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
DEFAULT_GOROUTINE_LEVELS = (("L1", 3000.0), ("L2", 5000.0), ("L3", 8000.0))
# actions that change nothing in the service
NOTIFY_ONLY = frozenset({"event", "webhook", "alertmanager"})
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|s|m|h)")
_DURATIONS = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|us|µs|s|m|h))+")
_UNITS = {"ms": 1e-3, "us": 1e-6, "µs": 1e-6, "s": 1.0, "m": 60.0, "h": 3600.0}
# Upper bounds: a value beyond them is a typo, and an infinite one stops the engine
# (an evaluation interval of .inf sleeps forever).
MAX_DURATION = 30 * 86400.0  # holds, cooldowns, windows: 30 days
MAX_INTERVAL = 3600.0  # evaluation_interval
MAX_BACKOFF = 100.0


@dataclass(frozen=True)
class SignalSpec:
    kind: str
    scope: str = "service"
    site: str = ""
    function: str = ""
    quantile: float = 0.99
    window: float = 30.0
    above: float | None = None
    below: float | None = None
    over_baseline: float | None = None
    baseline_window: float = 300.0
    growth_per_minute: float | None = None

    @property
    def threshold(self) -> float | None:
        """The signal's own firing threshold (levels without `above` use it)."""
        for v in (self.above, self.over_baseline, self.growth_per_minute):
            if v is not None:
                return v
        return None

    @property
    def unit(self) -> str:
        if self.kind == "function_latency":
            return "s"
        if self.kind == "panics" or self.growth_per_minute is not None:
            return "/min"
        return ""

    def describe(self) -> str:
        if self.kind == "function_latency":
            q = f"p{str(self.quantile)[2:].ljust(2, '0')}"
            what = f"{self.function} {q}"
            return what + (" over its baseline" if self.over_baseline is not None else "")
        if self.kind == "orphans" and self.growth_per_minute is not None:
            return "orphan growth per minute"
        if self.scope == "site":
            return f"{self.kind} of site {self.site or '(largest)'}"
        return f"{self.kind} per {self.scope}"


@dataclass(frozen=True)
class LevelSpec:
    name: str
    above: float
    clear_below: float | None
    actions: tuple[Action, ...]

    def firing(self, value: float) -> bool:
        return value > self.above

    def cleared(self, value: float) -> bool:
        if self.clear_below is None:
            return not self.firing(value)
        return value < self.clear_below

    @property
    def degrades(self) -> bool:
        """Whether entering it changes the service (what the blast radius counts)."""
        return any(a.type not in NOTIFY_ONLY for a in self.actions)


@dataclass(frozen=True)
class CooldownSpec:
    initial: float = 300.0
    backoff: float = 2.0
    max: float = 3600.0


@dataclass(frozen=True)
class RuleSpec:
    name: str
    signal: SignalSpec
    levels: tuple[LevelSpec, ...]
    consecutive: int = 1
    sustain_window: float = 0.0
    hold: float = 0.0
    recovery_signal: SignalSpec | None = None
    cooldown: CooldownSpec = CooldownSpec()
    services: tuple[str, ...] = ("*",)

    def applies_to(self, service: str) -> bool:
        return any(fnmatch.fnmatchcase(service, pat) for pat in self.services)

    def level_index(self, name: str) -> int:
        for i, lv in enumerate(self.levels):
            if lv.name == name:
                return i
        return -1


@dataclass(frozen=True)
class CompiledPolicy:
    version: int
    mode: str
    interval: float
    rules: tuple[RuleSpec, ...]
    max_services: int | None = None
    max_percent: float | None = None

    def allowed_degraded(self, services: int) -> int | None:
        """How many services may be degraded at once (None: no cap)."""
        caps = []
        if self.max_services is not None:
            caps.append(self.max_services)
        if self.max_percent is not None:
            caps.append(max(1, int(services * self.max_percent / 100.0)))
        return min(caps) if caps else None


class _Y:
    """A YAML value with the node it came from, so every error can name its line."""

    def __init__(self, value: Any, node: yaml.Node) -> None:
        self.value = value
        self.node = node

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, reason: str) -> NoReturn:
        raise PolicyError(self.line, reason)

    def get(self, key: str) -> _Y | None:
        if isinstance(self.node, yaml.MappingNode) and isinstance(self.value, dict):
            for k, v in self.node.value:
                if k.value == key and key in self.value:
                    return _Y(self.value[key], v)
        return None

    def key_line(self, key: str) -> int:
        if isinstance(self.node, yaml.MappingNode):
            for k, _ in self.node.value:
                if k.value == key:
                    return k.start_mark.line + 1
        return self.line

    def mapping(self, what: str, known: tuple[str, ...]) -> _Y:
        if not isinstance(self.value, dict):
            self.fail(f"{what} must be a mapping")
        for k in self.value:
            if k not in known:
                raise PolicyError(
                    self.key_line(str(k)),
                    f"unknown key {k!r} in {what} (known: {', '.join(known)})",
                )
        return self

    def items(self) -> list[_Y]:
        if not isinstance(self.node, yaml.SequenceNode) or not isinstance(self.value, list):
            self.fail("expected a list")
        return [_Y(v, n) for v, n in zip(self.value, self.node.value, strict=True)]


def parse_duration(y: _Y, what: str) -> float:
    """Seconds from 30, 2.5, "300ms", "2m", "1h30m"."""
    v = y.value
    text = v.replace(" ", "") if isinstance(v, str) else ""
    if isinstance(v, int | float) and not isinstance(v, bool):
        secs = float(v)
    elif text and _DURATIONS.fullmatch(text):
        secs = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
    else:
        y.fail(f"{what} must be a duration like 30s, 2m or 300ms, got {v!r}")
    if not math.isfinite(secs):
        y.fail(f"{what} must be a finite duration, got {v!r}")
    if secs < 0:
        y.fail(f"{what} must not be negative")
    if secs > MAX_DURATION:
        y.fail(f"{what} must be at most 30 days, got {secs:g}s")
    return secs


def _number(y: _Y, what: str, *, duration: bool = False, minimum: float | None = 0.0) -> float:
    v = y.value
    if isinstance(v, str) and duration:
        return parse_duration(y, what)
    if isinstance(v, bool) or not isinstance(v, int | float):
        y.fail(f"{what} must be a number" + (" or a duration like 300ms" if duration else ""))
    if not math.isfinite(v):
        y.fail(f"{what} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        y.fail(f"{what} must be >= {minimum:g}")
    return float(v)


_SIGNAL_KEYS = (
    "kind",
    "scope",
    "site",
    "function",
    "quantile",
    "window",
    "above",
    "below",
    "over_baseline",
    "baseline_window",
    "growth_per_minute",
)


def _signal(y: _Y, *, recovery: bool) -> SignalSpec:
    """A rule's signal (or recovery signal), checked in steps: its kind, what it
    watches, each threshold, then how the thresholds combine."""
    y.mapping("signal", _SIGNAL_KEYS)
    kind = _signal_kind(y)
    out: dict[str, Any] = {"kind": kind}
    _signal_target(y, kind, out)
    _signal_thresholds(y, kind, out)
    _check_threshold_combination(y, kind, out, recovery=recovery)
    spec = SignalSpec(**out)
    if spec.window > 290 and spec.kind in ("function_latency", "panics"):
        # the control plane keeps 300 s of windows (30 s slots beyond one minute)
        (y.get("window") or y).fail(
            "window can be at most 290s (the control plane keeps five minutes)"
        )
    return spec


def _signal_kind(y: _Y) -> str:
    kind_y = y.get("kind")
    if kind_y is None:
        y.fail(f"signal needs kind: (one of {', '.join(SIGNAL_KINDS)})")
    kind = kind_y.value
    if kind not in SIGNAL_KINDS:
        kind_y.fail(f"signal kind must be one of {', '.join(SIGNAL_KINDS)}, got {kind!r}")
    return str(kind)


def _signal_target(y: _Y, kind: str, out: dict[str, Any]) -> None:
    """What the signal watches: scope and site, or a function and its quantile."""
    latency = kind == "function_latency"
    scope_y = y.get("scope")
    if scope_y is not None:
        if kind not in ("goroutines", "orphans") or scope_y.value not in SCOPES:
            scope_y.fail(f"scope is one of {', '.join(SCOPES)}, for goroutines and orphans signals")
        out["scope"] = scope_y.value
    site_y = y.get("site")
    if site_y is not None:
        if not isinstance(site_y.value, str) or out.get("scope") != "site":
            site_y.fail("site: is a function or go statement (file:line), with scope: site")
        out["site"] = site_y.value
    fn_y = y.get("function")
    if latency:
        if fn_y is None or not isinstance(fn_y.value, str) or not fn_y.value:
            y.fail("a function_latency signal needs function: (the traced symbol)")
        out["function"] = fn_y.value
    elif fn_y is not None:
        fn_y.fail("function: belongs to function_latency signals")
    q_y = y.get("quantile")
    if q_y is not None:
        if not latency:
            q_y.fail("quantile: belongs to function_latency signals")
        qv = q_y.value
        if isinstance(qv, str) and qv in QUANTILES:
            out["quantile"] = QUANTILES[qv]
        elif isinstance(qv, int | float) and not isinstance(qv, bool) and 0 < qv < 1:
            out["quantile"] = float(qv)
        else:
            q_y.fail(f"quantile is one of {', '.join(QUANTILES)} or a number in (0, 1)")


def _signal_thresholds(y: _Y, kind: str, out: dict[str, Any]) -> None:
    """The window and each threshold, read on its own (combinations come after)."""
    latency = kind == "function_latency"
    w_y = y.get("window")
    if w_y is not None:
        out["window"] = parse_duration(w_y, "window")
        if out["window"] <= 0:
            w_y.fail("window must be longer than 0")
    for key in ("above", "below", "over_baseline"):
        k_y = y.get(key)
        if k_y is not None:
            out[key] = _number(k_y, key, duration=latency)
    b_y = y.get("baseline_window")
    if b_y is not None:
        if "over_baseline" not in out:
            b_y.fail("baseline_window goes with over_baseline")
        out["baseline_window"] = parse_duration(b_y, "baseline_window")
    g_y = y.get("growth_per_minute")
    if g_y is not None:
        if kind != "orphans":
            g_y.fail("growth_per_minute belongs to orphans signals")
        out["growth_per_minute"] = _number(g_y, "growth_per_minute", minimum=None)


def _check_threshold_combination(y: _Y, kind: str, out: dict[str, Any], *, recovery: bool) -> None:
    """One threshold per signal; below: only, and only, in a recovery signal."""
    if "over_baseline" in out and kind != "function_latency":
        y.fail("over_baseline belongs to function_latency signals")
    set_thresholds = [k for k in ("above", "over_baseline", "growth_per_minute") if k in out]
    if len(set_thresholds) > 1:
        y.fail(f"give one threshold, not {' and '.join(set_thresholds)}")
    if recovery:
        if "below" not in out or set_thresholds:
            y.fail(
                "a recovery signal needs below: (recovered while under it) and no other threshold"
            )
    elif "below" in out:
        raise PolicyError(y.key_line("below"), "below: belongs to a recovery signal")


def _actions(y: _Y, named: Mapping[str, Any]) -> tuple[Action, ...]:
    out = []
    for item in y.items():
        spec = item.value
        if isinstance(spec, str):
            if spec not in named:
                item.fail(
                    f"no action named {spec!r} under actions: (known: {', '.join(named) or 'none'})"
                )
            spec = named[spec]
        if not isinstance(spec, dict):
            item.fail("an action is a mapping with type: (or the name of one under actions:)")
        try:
            out.append(build_action(spec))
        except ActionSpecError as exc:
            line = item.key_line(exc.field) if isinstance(item.value, dict) else item.line
            raise PolicyError(line, f"{spec.get('type', 'action')} action: {exc.reason}") from exc
    return tuple(out)


def _levels(
    y: _Y | None, signal: SignalSpec, named: Mapping[str, Any], where: _Y
) -> tuple[LevelSpec, ...]:
    if y is None:
        if signal.kind == "goroutines" and signal.threshold is None:
            from goleash.control.actions import EventAction

            ev = (EventAction({"type": "event"}),)
            return tuple(LevelSpec(n, v, None, ev) for n, v in DEFAULT_GOROUTINE_LEVELS)
        if signal.threshold is None:
            where.fail("a rule needs levels: or a threshold in its signal (above:, over_baseline:)")
        from goleash.control.actions import EventAction

        return (LevelSpec("L1", signal.threshold, None, (EventAction({"type": "event"}),)),)
    levels: list[LevelSpec] = []
    for item in y.items():
        item.mapping("level", ("level", "above", "clear_below", "actions"))
        name_y = item.get("level")
        if name_y is None or not isinstance(name_y.value, str) or not name_y.value:
            item.fail("each level needs level: (a name such as L1)")
        name = name_y.value
        if any(lv.name == name for lv in levels):
            name_y.fail(f"level {name!r} appears twice")
        latency = signal.kind == "function_latency"
        above_y = item.get("above")
        above = _number(above_y, "above", duration=latency, minimum=None) if above_y else None
        if above is None:
            above = signal.threshold
        if above is None:
            item.fail(f"level {name} needs above: (the signal has no threshold of its own)")
        clear_y = item.get("clear_below")
        clear = _number(clear_y, "clear_below", duration=latency, minimum=None) if clear_y else None
        if clear_y is not None and clear is not None and clear > above:
            clear_y.fail(
                f"clear_below ({clear:g}) must not be above the level's threshold ({above:g})"
            )
        if levels and above <= levels[-1].above:
            (above_y or item).fail(
                f"levels go up: {name}'s threshold ({above:g}) must be above "
                f"{levels[-1].name}'s ({levels[-1].above:g})"
            )
        acts_y = item.get("actions")
        if acts_y is None:
            from goleash.control.actions import EventAction

            actions: tuple[Action, ...] = (EventAction({"type": "event"}),)
        else:
            actions = _actions(acts_y, named)
        levels.append(LevelSpec(name, above, clear, actions))
    if not levels:
        y.fail("levels is empty")
    return tuple(levels)


def _cooldown(y: _Y | None, default: CooldownSpec) -> CooldownSpec:
    if y is None:
        return default
    y.mapping("cooldown", ("initial", "backoff", "max"))
    i_y, b_y, m_y = y.get("initial"), y.get("backoff"), y.get("max")
    initial = parse_duration(i_y, "initial") if i_y is not None else default.initial
    backoff = _number(b_y, "backoff", minimum=1.0) if b_y is not None else default.backoff
    if backoff > MAX_BACKOFF:
        (b_y or y).fail(f"backoff must be at most {MAX_BACKOFF:g}")
    mx = parse_duration(m_y, "max") if m_y is not None else max(default.max, initial)
    if mx < initial:
        y.fail(f"cooldown max ({mx:g}s) is shorter than initial ({initial:g}s)")
    return CooldownSpec(initial, backoff, mx)


def _rule(y: _Y, named: Mapping[str, Any], levels_default: _Y | None, cd: CooldownSpec) -> RuleSpec:
    y.mapping(
        "a rule",
        ("name", "description", "services", "signal", "sustain", "levels", "recovery", "cooldown"),
    )
    name = str(y.value["name"])
    sig_y = y.get("signal")
    assert sig_y is not None  # parse_policy checked it
    signal = _signal(sig_y, recovery=False)
    lv_y = y.get("levels")
    if lv_y is None and signal.kind == "goroutines" and signal.threshold is None:
        lv_y = levels_default
    levels = _levels(lv_y, signal, named, y)
    consecutive, window = 1, 0.0
    s_y = y.get("sustain")
    if s_y is not None:
        s_y.mapping("sustain", ("consecutive", "window"))
        c_y, w_y = s_y.get("consecutive"), s_y.get("window")
        if c_y is not None and w_y is not None:
            s_y.fail("sustain takes consecutive: or window:, not both")
        if c_y is not None:
            if (
                isinstance(c_y.value, bool)
                or not isinstance(c_y.value, int)
                or not 1 <= c_y.value <= 10_000
            ):
                c_y.fail("consecutive must be a whole number from 1 to 10000")
            consecutive = c_y.value
        if w_y is not None:
            window = parse_duration(w_y, "sustain window")
    hold, rsig = 0.0, None
    r_y = y.get("recovery")
    if r_y is not None:
        r_y.mapping("recovery", ("hold", "signal"))
        h_y, rs_y = r_y.get("hold"), r_y.get("signal")
        if h_y is not None:
            hold = parse_duration(h_y, "hold")
        if rs_y is not None:
            rsig = _signal(rs_y, recovery=True)
    services: tuple[str, ...] = ("*",)
    sv_y = y.get("services")
    if sv_y is not None:
        items = sv_y.items()
        if not items or not all(isinstance(i.value, str) and i.value for i in items):
            sv_y.fail("services is a list of service names or globs")
        services = tuple(i.value for i in items)
    return RuleSpec(
        name=name,
        signal=signal,
        levels=levels,
        consecutive=consecutive,
        sustain_window=window,
        hold=hold,
        recovery_signal=rsig,
        cooldown=_cooldown(y.get("cooldown"), cd),
        services=services,
    )


def compile_document(doc: PolicyDocument, version: int = 0) -> CompiledPolicy:
    """Typed rules of a policy; PolicyError(line, reason) on anything the engine cannot run."""
    root_node = yaml.compose(doc.text, Loader=yaml.SafeLoader)
    root = _Y(doc.raw, root_node)
    interval = 10.0
    i_y = root.get("evaluation_interval")
    if i_y is not None:
        interval = parse_duration(i_y, "evaluation_interval")
        if not 0.1 <= interval <= MAX_INTERVAL:
            i_y.fail("evaluation_interval must be between 100ms and 1h")
    d_y = root.get("defaults")
    if d_y is not None:
        d_y.mapping("defaults", ("on_no_data",))
        nd = d_y.get("on_no_data")
        if nd is not None and nd.value != "hold":
            nd.fail("on_no_data can only be hold: without data the engine never acts")
    max_services = max_percent = None
    b_y = root.get("blast_radius")
    if b_y is not None:
        b_y.mapping("blast_radius", ("max_services", "max_percent"))
        ms = b_y.get("max_services")
        if ms is not None:
            if isinstance(ms.value, bool) or not isinstance(ms.value, int) or ms.value < 1:
                ms.fail("max_services must be a whole number >= 1")
            max_services = ms.value
        mp = b_y.get("max_percent")
        if mp is not None:
            max_percent = _number(mp, "max_percent")
            if not 0 < max_percent <= 100:
                mp.fail("max_percent must be in (0, 100]")
    named: dict[str, Any] = {}
    a_y = root.get("actions")
    if a_y is not None:
        if not isinstance(a_y.value, dict):
            a_y.fail("actions is a mapping of names to actions")
        for k, v in a_y.value.items():
            if not isinstance(v, dict):
                raise PolicyError(
                    a_y.key_line(str(k)), f"action {k!r} must be a mapping with type:"
                )
            try:
                build_action(v)
            except ActionSpecError as exc:
                raise PolicyError(a_y.key_line(str(k)), f"action {k!r}: {exc.reason}") from exc
        named = dict(a_y.value)
    cd = _cooldown(root.get("cooldown"), CooldownSpec())
    rules = []
    r_y = root.get("rules")
    if r_y is not None and r_y.value:
        for item in r_y.items():
            rules.append(_rule(item, named, root.get("levels"), cd))
    return CompiledPolicy(
        version=version,
        mode=doc.mode,
        interval=interval,
        rules=tuple(rules),
        max_services=max_services,
        max_percent=max_percent,
    )
