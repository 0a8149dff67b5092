"""What the control plane knows: agents, processes and services, with time windows.

`Store.ingest` applies agent batches (checked first against the caps: `holdings`);
the read model (`queries`) reads the Store for readers inside the control plane, and
`answers` turns that into the GoleashService RPCs' messages. No gRPC and no I/O here:
events go out through the `emit` callback (the server wires it to the SQLite log) and
time is passed in, so all of it runs in unit tests on plain data.

Service = ProcessInfo.service (Kubernetes workload when the agent knows it, else the
executable's name). Windows are kept per process and per service; point-in-time
numbers (live goroutines, ages, wait reasons, orphans) come from each process's
latest snapshot. The records themselves are in `records`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import detect
from goleash.control import limits as caps
from goleash.control.detect import LeakVerdict
from goleash.control.holdings import check_holdings
from goleash.control.limits import (
    DEFAULT_LIMITS,
    ControlError,
    InvalidArgument,
    Limits,
    NotFound,
    ResourceExhausted,
)
from goleash.control.records import (
    LIVE,
    OLDEST,
    PROC_KINDS,
    SITE_KINDS,
    AgentState,
    ProcKey,
    ProcState,
    Selection,
    ServiceSite,
    ServiceState,
    SiteKey,
    SiteState,
    service_of,
)
from goleash.control.windows import DEFAULT_TIERS, HistogramWindows, Tier, Windows, retention

# the API's selector, or the read model's plain one (same fields)
Selector = q.ProcessSelector | Selection

DEFAULT_WINDOW = 60.0
DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 0.999)
STALE_INTERVALS = 3
UNANNOUNCED = "snapshot_of_unannounced_process"

Emit = Callable[..., Any]  # EventLog.append's signature

# the errors a caller of the Store catches, importable from here
__all__ = ["ControlError", "InvalidArgument", "NotFound", "ResourceExhausted", "Store"]


def non_negative(name: str, v: float) -> float:
    if math.isnan(v) or v < 0:
        raise InvalidArgument(f"{name} must be a number >= 0, got {v}")
    return v


class Store:
    """Everything the agents reported, with windows."""

    def __init__(
        self,
        emit: Emit,
        *,
        tiers: Sequence[Tier] = DEFAULT_TIERS,
        leak: detect.LeakParams = detect.DEFAULT_LEAK_PARAMS,
        known_processes: Iterable[tuple[str, int, int]] = (),
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._emit = emit
        self.limits = limits
        self.tiers = tuple(tiers)
        # Per-process latency keeps only the coarsest tier: histograms are the bulk of
        # the memory (a dict per slot), and the finer windows matter per service.
        self.process_latency_tiers = self.tiers[-1:]
        self.retention = retention(self.tiers)
        self.leak = leak
        self.agents: dict[str, AgentState] = {}
        self.procs: dict[ProcKey, ProcState] = {}
        self.services: dict[str, ServiceState] = {}
        self.suspects: dict[tuple[str, SiteKey], LeakVerdict] = {}
        self._with_orphans: set[ProcKey] = set()
        self.sites_held = 0  # sum of the agents' `sites`
        self._checked: tuple[ing.AgentBatch, tuple[int, int]] | None = None
        # (agent, pid, start time) of processes whose PROCESS_APPEARED is already in
        # the log: a re-announcement after a restart of the control plane is no news.
        self._known: set[tuple[str, int, int]] = set(known_processes)

    # --- ingest --------------------------------------------------------------

    def stream_opened(self, identity: t.AgentIdentity, now: float) -> None:
        a = self._agent(identity, now)
        a.streams += 1
        self._emit(
            t.EVENT_KIND_AGENT_CONNECTED,
            f"agent {identity.agent_id} on {identity.node_name or '?'} connected",
            agent_id=identity.agent_id,
            details={"instance_id": identity.instance_id, "version": identity.version},
        )

    def stream_closed(self, agent_id: str, now: float, why: str = "stream ended") -> None:
        a = self.agents.get(agent_id)
        if a is None:
            return
        a.streams = max(a.streams - 1, 0)
        self._emit(
            t.EVENT_KIND_AGENT_DISCONNECTED,
            f"agent {agent_id} disconnected ({why})",
            agent_id=agent_id,
            details={"last_sequence": a.last_sequence, "reason": why},
        )

    def _agent(self, identity: t.AgentIdentity, now: float) -> AgentState:
        a = self.agents.get(identity.agent_id)
        if a is None:
            a = self.agents[identity.agent_id] = AgentState(t.AgentIdentity(), first_seen=now)
            a.identity.CopyFrom(identity)
        return a

    def check_batch(self, b: ing.AgentBatch) -> tuple[int, int]:
        """Everything that can be judged before the Store changes (ControlError);
        returns the sites the agent holds once the batch is applied, and how many
        over-long strings were cut."""
        cut = caps.check_batch(b, self.limits)
        sites = check_holdings(self, b)
        self._checked = (b, (sites, cut))
        return sites, cut

    def ingest(self, b: ing.AgentBatch, now: float) -> bool:
        """Apply one batch; False when it was a duplicate (already applied). A batch
        that fails `check_batch` raises and changes nothing."""
        # the server checks a stream's first batch before opening it: its strings are
        # cut already, so reuse that answer (and its count) when nothing came between
        last, self._checked = self._checked, None
        sites, cut = last[1] if last is not None and last[0] is b else self.check_batch(b)
        self._checked = None
        a = self._agent(b.agent, now)
        a.last_seen = now
        if b.agent.instance_id != a.instance_id:
            a.instance_id, a.last_sequence = b.agent.instance_id, 0
        if b.sequence <= a.last_sequence:
            a.duplicates += 1
            return False
        if a.last_sequence and b.sequence > a.last_sequence + 1:
            missing = b.sequence - a.last_sequence - 1
            a.gaps += missing
            self._emit(
                t.EVENT_KIND_AGENT_SEQUENCE_GAP,
                f"agent {b.agent.agent_id}: {missing} batch(es) never arrived "
                f"(sequence {a.last_sequence} then {b.sequence})",
                agent_id=b.agent.agent_id,
                details={"missing": missing, "after": a.last_sequence, "got": b.sequence},
            )
        a.last_sequence = b.sequence
        a.batches += 1
        self.sites_held += sites - a.sites
        a.sites = sites
        a.identity.CopyFrom(b.agent)
        a.heartbeat = b.heartbeat
        for d in b.drops:
            caps.add_drop(a.drops, d.reason, d.count, self.limits.drop_reasons)
        if cut:
            caps.add_drop(a.drops, caps.TRUNCATED_TEXT, cut, self.limits.drop_reasons)
        for info in b.processes_appeared:
            self._appeared(a, info, now)
        for snap in b.snapshots:
            self._snapshot(a, snap, now)
        for gone in b.processes_gone:
            self._gone(a, gone.pid, gone.start_time_unix_nano, gone.reason or "gone", now)
        return True

    def _service(self, name: str) -> ServiceState:
        svc = self.services.get(name)
        if svc is None:
            svc = self.services[name] = ServiceState(name, Windows(PROC_KINDS, self.tiers))
        return svc

    def _appeared(self, a: AgentState, info: t.ProcessInfo, now: float) -> None:
        agent_id = a.identity.agent_id
        key = (agent_id, info.pid)
        p = self.procs.get(key)
        if p is not None and p.gone_at is None:
            old_start = p.info.start_time_unix_nano
            if old_start and info.start_time_unix_nano and old_start != info.start_time_unix_nano:
                self._gone(a, info.pid, old_start, "pid reused by a new process", now)
                p = None
        if p is not None and p.gone_at is not None:
            p = None
        if p is None:
            service = service_of(info)
            p = ProcState(key, info, service, now, Windows(PROC_KINDS, self.tiers), last_seen=now)
            self.procs[key] = p
            self._service(service).procs.add(key)
            a.procs.add(key)
            ident = (agent_id, info.pid, info.start_time_unix_nano)
            if ident not in self._known:
                self._known.add(ident)
                mode = t.TrackingMode.Name(info.tracking_mode)
                self._emit(
                    t.EVENT_KIND_PROCESS_APPEARED,
                    f"{service} pid {info.pid} on {a.identity.node_name or agent_id} "
                    f"({info.go_version or 'go?'}, {mode.removeprefix('TRACKING_MODE_').lower()})",
                    service=service,
                    agent_id=agent_id,
                    pid=info.pid,
                    details={
                        "exe": info.exe,
                        "go_version": info.go_version,
                        "start_time_unix_nano": info.start_time_unix_nano,
                        "tracking_mode": mode,
                        "tracking_reason": info.tracking_reason,
                    },
                )
            return
        if info.tracking_mode != p.info.tracking_mode:
            self._emit(
                t.EVENT_KIND_PROCESS_TRACKING_CHANGED,
                f"{p.service} pid {info.pid}: now {t.TrackingMode.Name(info.tracking_mode)}"
                + (f" ({info.tracking_reason})" if info.tracking_reason else ""),
                service=p.service,
                agent_id=agent_id,
                pid=info.pid,
                details={
                    "from": t.TrackingMode.Name(p.info.tracking_mode),
                    "to": t.TrackingMode.Name(info.tracking_mode),
                    "reason": info.tracking_reason,
                },
            )
        service = service_of(info)
        if service != p.service:
            self._detach(p, now)
            p.service = service
            self._attach(p, now)
        p.info = info

    def _detach(self, p: ProcState, now: float) -> None:
        """Take the process's live numbers out of its service."""
        svc = self._service(p.service)
        svc.procs.discard(p.key)
        svc.goroutines -= p.goroutines
        for k, s in p.sites.items():
            site = svc.sites.get(k)
            if site is not None and s.live:
                site.live -= s.live
                site.windows.record(now, (0, 0, site.live, 0))
        svc.windows.record(now, (0, 0, svc.goroutines, 0))

    def _attach(self, p: ProcState, now: float) -> None:
        svc = self._service(p.service)
        svc.procs.add(p.key)
        svc.goroutines += p.goroutines
        for k, s in p.sites.items():
            site = svc.sites.get(k)
            if site is None:
                site = svc.sites[k] = ServiceSite(s.creator, Windows(SITE_KINDS, self.tiers))
            site.live += s.live
            site.windows.record(now, (0, 0, site.live, s.oldest))

    def _snapshot(self, a: AgentState, s: ing.ProcessSnapshot, now: float) -> None:
        p = self.procs.get((a.identity.agent_id, s.pid))
        if p is None or p.gone_at is not None:
            caps.add_drop(a.drops, UNANNOUNCED, 1, self.limits.drop_reasons)
            return
        for reason, n in caps.truncate(s, self.limits).items():
            caps.add_drop(p.drops, reason, n, self.limits.drop_reasons)
        svc = self._service(p.service)
        p.last_seen = now
        svc.goroutines += s.goroutines - p.goroutines
        p.goroutines = s.goroutines
        created, exited, orphans, seen = self._record_sites(a, p, svc, s, now)
        self._release_absent_sites(p, svc, seen, now)
        p.orphans = orphans
        if orphans:
            self._with_orphans.add(p.key)
        else:
            self._with_orphans.discard(p.key)
        panics = self._panics(a, p, s)
        p.windows.record(now, (created, exited, s.goroutines, panics))
        svc.windows.record(now, (created, exited, svc.goroutines, panics))
        self._record_latency(p, svc, s, now)
        for d in s.drops:
            caps.add_drop(p.drops, d.reason, d.count, self.limits.drop_reasons)
        p.kept = s.goroutines_kept

    def _record_sites(
        self, a: AgentState, p: ProcState, svc: ServiceState, s: ing.ProcessSnapshot, now: float
    ) -> tuple[int, int, int, set[SiteKey]]:
        """Each reported site into the process's and the service's windows; returns the
        goroutines created and exited since the last snapshot, the orphans now, and the
        sites seen."""
        created = exited = orphans = 0
        seen: set[SiteKey] = set()
        tiers = self.tiers
        for ss in s.sites:
            k = (ss.function, ss.go_statement)
            seen.add(k)
            site = p.sites.get(k)
            if site is None:
                site = p.sites[k] = SiteState(
                    ss.creator_function, Windows(SITE_KINDS, tiers), touched=now
                )
            ssite = svc.sites.get(k)
            if ssite is None:
                ssite = svc.sites[k] = ServiceSite(ss.creator_function, Windows(SITE_KINDS, tiers))
            live = ss.live
            ssite.live += live - site.live
            site.live = live
            site.summary = ss
            site.touched = now
            n_orphans = ss.orphans.count
            if n_orphans and not site.orphans:
                self._orphans_appeared(a, p, ss)
            if n_orphans:
                p.orphan_sites.add(k)
            elif site.orphans:
                p.orphan_sites.discard(k)
            site.orphans = n_orphans
            orphans += n_orphans
            c, e, oldest = ss.created, ss.exited, ss.age.max_seconds
            site.windows.record(now, (c, e, live, oldest))
            ssite.windows.record(now, (c, e, ssite.live, oldest))
            created += c
            exited += e
        return created, exited, orphans, seen

    def _orphans_appeared(self, a: AgentState, p: ProcState, ss: ing.SiteSummary) -> None:
        o = ss.orphans
        self._emit(
            t.EVENT_KIND_ORPHANS_APPEARED,
            f"{p.service} pid {p.key[1]}: {o.count} orphaned goroutine(s) of "
            f"{ss.function} created at {ss.go_statement}, parked in "
            f"{o.dominant_wait_reason or '?'}",
            service=p.service,
            agent_id=a.identity.agent_id,
            pid=p.key[1],
            details={
                "function": ss.function,
                "go_statement": ss.go_statement,
                "count": o.count,
                "oldest_age_s": o.oldest_age_seconds,
                "reason": o.dominant_wait_reason,
            },
        )

    def _release_absent_sites(
        self, p: ProcState, svc: ServiceState, seen: set[SiteKey], now: float
    ) -> None:
        """Sites the snapshot no longer reports have no live goroutines: zero them, and
        forget them once idle past the retention (at once when over the cap)."""
        for k in [k for k in p.sites if k not in seen]:
            site = p.sites[k]
            if site.live or site.orphans:
                ssite = svc.sites[k]
                ssite.live -= site.live
                ssite.windows.record(now, (0, 0, ssite.live, 0))
                site.live = site.orphans = 0
                p.orphan_sites.discard(k)
                site.summary = None
                site.windows.record(now, (0, 0, 0, 0))
            elif (
                now - site.touched > self.retention or len(p.sites) > self.limits.sites_per_process
            ):
                del p.sites[k]  # idle: forgotten after the retention, or at once when over the cap

    def _panics(self, a: AgentState, p: ProcState, s: ing.ProcessSnapshot) -> int:
        """Panics since the last snapshot, logged as one event when there were any."""
        panics = 0
        for pc in s.panics:
            panics += pc.count
        if panics:
            self._emit(
                t.EVENT_KIND_PANICS,
                f"{p.service} pid {s.pid}: {panics} panic(s)",
                service=p.service,
                agent_id=a.identity.agent_id,
                pid=s.pid,
                details={"by_function": {pc.function or "?": pc.count for pc in s.panics}},
            )
        return panics

    def _record_latency(
        self, p: ProcState, svc: ServiceState, s: ing.ProcessSnapshot, now: float
    ) -> None:
        """Each traced function's histogram into the process's and the service's windows."""
        for lat in s.latency:
            h = lat.histogram
            buckets = [(b.index, b.count) for b in h.buckets]
            for owner, owner_tiers in (
                (p.latency, self.process_latency_tiers),
                (svc.latency, self.tiers),
            ):
                hw = owner.get(lat.function)
                if hw is None:
                    hw = owner[lat.function] = HistogramWindows(owner_tiers)
                hw.record(
                    now,
                    h.sub_bucket_bits,
                    buckets,
                    h.count,
                    h.sum_seconds,
                    calls=lat.calls if lat.HasField("calls") else None,
                    calls_error=lat.calls_error,
                )

    def _gone(self, a: AgentState, pid: int, start: int, reason: str, now: float) -> None:
        key = (a.identity.agent_id, pid)
        p = self.procs.get(key)
        if p is None or p.gone_at is not None:
            return
        if start and p.info.start_time_unix_nano and start != p.info.start_time_unix_nano:
            return  # about an older process with the same pid
        self._detach(p, now)
        p.gone_at, p.gone_reason = now, reason
        p.goroutines = p.orphans = 0
        p.orphan_sites.clear()
        p.kept = ()
        self._with_orphans.discard(key)
        a.procs.discard(key)
        self._known.discard((key[0], pid, p.info.start_time_unix_nano))
        self._emit(
            t.EVENT_KIND_PROCESS_GONE,
            f"{p.service} pid {pid} gone ({reason})",
            service=p.service,
            agent_id=key[0],
            pid=pid,
            details={"reason": reason, "start_time_unix_nano": p.info.start_time_unix_nano},
        )

    # --- upkeep ----------------------------------------------------------------

    def prune(self, now: float) -> None:
        """Forget what fell out of the retention: gone processes, idle sites, services,
        and agents disconnected for longer than the agent TTL (with their processes)."""
        ttl = now - self.limits.agent_ttl_seconds
        for agent_id in [i for i, a in self.agents.items() if not a.streams and a.last_seen < ttl]:
            self._forget_agent(agent_id, now)
        horizon = now - self.retention
        for key in [k for k, p in self.procs.items() if p.gone_at and p.gone_at < horizon]:
            del self.procs[key]
        for name, svc in list(self.services.items()):
            for k in [k for k, s in svc.sites.items() if not s.live]:
                if svc.sites[k].windows.latest_time() < horizon:
                    del svc.sites[k]
            if not svc.procs and not svc.sites and svc.windows.latest_time() < horizon:
                del self.services[name]

    def _forget_agent(self, agent_id: str, now: float) -> None:
        a = self.agents.pop(agent_id)
        self.sites_held -= a.sites
        for key in [k for k in self.procs if k[0] == agent_id]:
            p = self.procs.pop(key)
            if p.gone_at is None:
                self._detach(p, now)
            self._with_orphans.discard(key)
        self._known = {k for k in self._known if k[0] != agent_id}
        self._emit(
            t.EVENT_KIND_AGENT_DISCONNECTED,
            f"agent {agent_id} forgotten: no batch for {self.limits.agent_ttl_seconds:g}s",
            agent_id=agent_id,
            details={"reason": "ttl", "last_sequence": a.last_sequence},
        )

    def detect(self, now: float) -> None:
        """Re-judge leak suspects per service site; log the ones that start or stop."""
        found: dict[tuple[str, SiteKey], LeakVerdict] = {}
        for svc in self.services.values():
            for k, site in svc.sites.items():
                v = self.judge(site.windows, now, self.leak.window_seconds)
                if v is not None:
                    found[(svc.name, k)] = v
        for (service, (fn, stmt)), v in found.items():
            if (service, (fn, stmt)) not in self.suspects:
                self._emit(
                    t.EVENT_KIND_LEAK_SUSPECTED,
                    f"{service}: goroutines of {fn} created at {stmt} keep piling up "
                    f"({v.live_at_start:.0f} -> {v.live:.0f}, {v.growth_per_minute:+.0f}/min, "
                    f"oldest {v.oldest_age:.0f}s)",
                    service=service,
                    details={"function": fn, "go_statement": stmt, **v.__dict__},
                )
        for service, (fn, stmt) in self.suspects:
            if (service, (fn, stmt)) not in found:
                self._emit(
                    t.EVENT_KIND_LEAK_CLEARED,
                    f"{service}: {fn} created at {stmt} stopped growing",
                    service=service,
                    details={"function": fn, "go_statement": stmt},
                )
        self.suspects = found

    def judge(self, w: Windows, now: float, window: float) -> LeakVerdict | None:
        live = w.series(now, window, LIVE)
        oldest = w.series(now, window, OLDEST)
        points = [detect.SitePoint(t0, v, o) for (t0, v), (_, o) in zip(live, oldest, strict=True)]
        return detect.assess(points, self.leak)

    # --- selection ---------------------------------------------------------------

    def window(self, seconds: float, default: float = DEFAULT_WINDOW) -> float:
        if math.isnan(seconds) or seconds < 0:
            raise InvalidArgument(
                f"window_seconds must be >= 0 (0 means {default:g}), got {seconds}"
            )
        w = seconds or default
        if w > self.retention:
            raise InvalidArgument(
                f"window_seconds {w:g} is longer than the retention ({self.retention:g}s)"
            )
        return w

    def check_selector(self, sel: Selector) -> None:
        if sel.service and sel.service not in self.services:
            known = ", ".join(sorted(self.services)[:10]) or "none yet"
            raise NotFound(f"no service named {sel.service!r} (known: {known})")
        if sel.agent_id and sel.agent_id not in self.agents:
            known = ", ".join(sorted(self.agents)[:10]) or "none yet"
            raise NotFound(f"no agent with id {sel.agent_id!r} (known: {known})")
        if sel.pid and not any(k[1] == sel.pid for k in self.procs):
            raise NotFound(f"no followed process with pid {sel.pid}")

    @staticmethod
    def matches(p: ProcState, sel: Selector) -> bool:
        return (
            (not sel.service or p.service == sel.service)
            and (not sel.agent_id or p.key[0] == sel.agent_id)
            and (not sel.pid or p.key[1] == sel.pid)
        )

    def select(self, sel: Selector, *, include_gone: bool = False) -> list[ProcState]:
        self.check_selector(sel)
        if sel.service and not include_gone:
            keys: Iterable[ProcKey] = self.services[sel.service].procs
            procs = [self.procs[k] for k in keys]
        else:
            procs = list(self.procs.values())
        return [p for p in procs if (include_gone or p.gone_at is None) and self.matches(p, sel)]

    def process_state(self, p: ProcState, now: float) -> int:
        if p.gone_at is not None:
            return q.PROCESS_STATE_GONE
        a = self.agents.get(p.key[0])
        interval = a.interval if a else 5.0
        if now - p.last_seen > STALE_INTERVALS * interval:
            return q.PROCESS_STATE_STALE
        return q.PROCESS_STATE_RUNNING

    @property
    def with_orphans(self) -> set[ProcKey]:
        """Processes with orphans now (what an orphan query walks)."""
        return self._with_orphans
