"""Tracker snapshots as ingest API messages (goleash.v1 ProcessInfo, ProcessSnapshot).

The tracker counts since attach; the API wants deltas since the previous snapshot of
the same process (proto/goleash/v1/ingest_service.proto), so one `SnapshotExporter`
per process remembers what it reported. Sites are keyed by (function, go statement),
as the control plane keys them. The runtime's own goroutines (GC workers and the
like, which runtime.Stack, pprof and runtime.NumGoroutine leave out) are left out
too, so "goroutines" is the number a Go programmer would see.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.errors import GoleashError, StageFailure
from goleash.node.discovery import Candidate
from goleash.node.resend import RowAges, Sent, quantile_goids
from goleash.node.tracker import ProcessSnapshot, SiteSummary
from goleash.probes.creation import SYSTEM_KEEP, site_at
from goleash.probes.inventory import Goroutine
from goleash.probes.stacks import Stack, StackKey, walk_stacks
from goleash.probes.target import GoProcess

# goid, id of its Stack, function, go statement, status, wait reason, gopc, startpc
_TemplateKey = tuple[int, int, str, str, str, str | None, int, int]

DEFAULT_MAX_KEPT = 200  # individual goroutines per process and snapshot
KEPT_FRAMES = 32
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

STATES = {
    "idle": t.GOROUTINE_STATE_IDLE,
    "runnable": t.GOROUTINE_STATE_RUNNABLE,
    "running": t.GOROUTINE_STATE_RUNNING,
    "syscall": t.GOROUTINE_STATE_SYSCALL,
    "waiting": t.GOROUTINE_STATE_WAITING,
    "leaked": t.GOROUTINE_STATE_WAITING,  # Go 1.26's leak detector marks parked ones
    "dead": t.GOROUTINE_STATE_DEAD,
    "copystack": t.GOROUTINE_STATE_COPYSTACK,
    "preempted": t.GOROUTINE_STATE_PREEMPTED,
}
TRACKER_DROPS = {
    "live_table_full": "goroutine_table_full",
    "site_table_full": "site_table_full",
    "read_faults": "probe_read_faults",
    "stack_faults": "probe_stack_faults",
}


def is_system_function(name: str) -> bool:
    """A goroutine started in this function belongs to the runtime (inventory.py's
    is_system_goroutine, by name)."""
    return name.startswith("runtime.") and name not in SYSTEM_KEEP


def site_name(s: SiteSummary) -> tuple[str, str]:
    """(function, go statement) of a tracker site, as the API keys sites."""
    return (s.function, s.go_statement)


def boot_time_s(proc_root: str = "/proc") -> float:
    with open(f"{proc_root}/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError(f"{proc_root}/stat has no btime line")


def start_time_unix_nano(start_ticks: int, boot_s: float) -> int:
    return int((boot_s + start_ticks / os.sysconf("SC_CLK_TCK")) * 1e9)


def process_info(
    c: Candidate,
    *,
    service: str,
    boot_s: float,
    mode: str,
    reason: str,
) -> t.ProcessInfo:
    info = t.ProcessInfo(
        pid=c.pid,
        start_time_unix_nano=start_time_unix_nano(c.start_ticks, boot_s),
        exe=c.exe,
        service=service,
        go_version=c.go_version,
        tracking_mode=t.TRACKING_MODE_PROBES
        if mode == "probes"
        else t.TRACKING_MODE_INVENTORY_ONLY,
        tracking_reason="" if mode == "probes" else reason,
        container_id=c.container_id,
        module_path=c.main_module or "",
    )
    k = c.kube
    if k is not None:
        info.kubernetes.CopyFrom(
            t.KubernetesRef(
                namespace=k.namespace,
                pod=k.pod,
                pod_uid=k.pod_uid,
                container=k.container,
                workload_kind=k.workload_kind,
                workload_name=k.workload_name,
            )
        )
    return info


def service_name(c: Candidate) -> str:
    """Kubernetes "namespace/workload" when known, else the executable's name."""
    if c.kube is not None and c.kube.service:
        return c.kube.service
    return os.path.basename(c.exe)


# --- latency and panics --------------------------------------------------------------


@dataclass
class LatencyDelta:
    """Calls of one traced function timed since the previous snapshot (log-linear
    buckets in the API's layout: probes/hist.py and types.proto agree)."""

    function: str
    sub_bucket_bits: int
    buckets: dict[int, int]
    count: int  # calls timed
    sum_ns: int
    calls: int | None = None  # every call, timed or not
    calls_error: float = 0.0  # +- bound when `calls` is an estimate


def _quantiles(sorted_vals: Sequence[float]) -> tuple[float, float, float, float]:
    if not sorted_vals:
        return (0.0, 0.0, 0.0, 0.0)
    n = len(sorted_vals)

    def q(x: float) -> float:
        return sorted_vals[min(n - 1, max(0, round(x * (n - 1))))]

    return (q(0.5), q(0.9), q(0.99), sorted_vals[-1])


# --- snapshots ---------------------------------------------------------------------


def _add_latency(out: ing.ProcessSnapshot, latency: Iterable[LatencyDelta]) -> None:
    for d in latency:
        lat = out.latency.add(function=d.function)
        h = lat.histogram
        h.sub_bucket_bits, h.count, h.sum_seconds = d.sub_bucket_bits, d.count, d.sum_ns / 1e9
        if d.calls is not None:
            lat.calls, lat.calls_error = d.calls, d.calls_error
        for idx in sorted(d.buckets):
            h.buckets.add(index=idx, count=d.buckets[idx])


class SnapshotExporter:
    """One process's snapshots as API messages, with counters turned into deltas."""

    def __init__(self, proc: GoProcess, *, max_kept: int = DEFAULT_MAX_KEPT) -> None:
        self.proc = proc
        self.max_kept = max_kept
        self._last_sites: dict[tuple[str, str], tuple[int, int]] = {}
        self._last_drops: dict[str, int] = {}
        self._creators: dict[int, str] = {}
        # Kept goroutines' stacks from the previous snapshot (probes/stacks.py memo),
        # and their messages but for what changes each snapshot (_template): a parked
        # goroutine of an idle process is neither walked nor converted again.
        self._stack_memo: dict[StackKey, Stack] = {}
        self._templates: dict[_TemplateKey, tuple[Stack | None, t.Goroutine]] = {}
        self._sent: Sent | None = None  # the last message and what it was made of

    def creator(self, gopc: int) -> str:
        name = self._creators.get(gopc)
        if name is None:
            sl = self.proc.pclntab.call_site(gopc) if gopc else None
            name = self._creators[gopc] = sl.function if sl is not None else ""
        return name

    @staticmethod
    def _delta(now: int, before: int) -> int:
        # The kernel's counters only grow; smaller means they started over.
        return now - before if now >= before else now

    def message(
        self,
        snap: ProcessSnapshot,
        *,
        latency: Iterable[LatencyDelta] = (),
        panics: Mapping[str, int] | None = None,
        extra_drops: Mapping[str, int] | None = None,
        keep: bool = True,
    ) -> ing.ProcessSnapshot:
        """keep=False leaves individual goroutines out (the final snapshot of an
        exited process, whose memory can no longer be read for stacks). The message
        returned is never changed afterwards; its receiver must not change it either
        (the next message of an unchanged process starts from a copy of it)."""
        out = self._again(snap, keep) if self._sent is not None else None
        if out is None:
            out = self._afresh(snap, keep)
        _add_latency(out, latency)
        for fn, n in sorted((panics or {}).items()):
            if n:
                out.panics.add(function=fn, count=n)
        self._add_drops(out, snap, extra_drops or {})
        return out

    def _afresh(self, snap: ProcessSnapshot, keep: bool) -> ing.ProcessSnapshot:
        names = {(s.gopc, s.startpc): site_name(s) for s in snap.sites}
        members: dict[tuple[str, str], list[Goroutine]] = {}
        for g in snap.goroutines:
            site = names.get((g.gopc, g.startpc))
            if site is not None and not is_system_function(site[0]):
                members.setdefault(site, []).append(g)
        out = ing.ProcessSnapshot(pid=snap.pid, time_unix_nano=int(snap.taken_at * 1e9))
        sent = Sent(snap.state_id, keep, out)
        out.goroutines = self._add_sites(out, snap, members, sent)
        if keep:
            out.goroutines_kept.extend(self._kept(snap, names, members, sent))
        self._sent = sent
        return out

    def _again(self, snap: ProcessSnapshot, keep: bool) -> ing.ProcessSnapshot | None:
        """The last message again with the clock moved on, when SNAP is of the same
        state as the one it was made from (see node/summary.py); None if it is not."""
        sent = self._sent
        assert sent is not None
        if sent.state_id != snap.state_id or sent.keep != keep or not snap.state_id:
            return None
        stacks: dict[int, Stack] = {}
        if sent.kept:
            try:
                stacks = walk_stacks(self.proc, sent.kept, KEPT_FRAMES, memo=self._stack_memo)
            except GoleashError:
                raise
            except Exception as exc:
                raise StageFailure("stacks", exc) from exc
        out = sent.next_message(snap, stacks, self._blocked)
        if out is not None:
            self._sent = sent
        return out

    def _add_sites(
        self,
        out: ing.ProcessSnapshot,
        snap: ProcessSnapshot,
        members: Mapping[tuple[str, str], list[Goroutine]],
        sent: Sent,
    ) -> int:
        """One entry per site that has live goroutines or created/exited some since the
        last message; returns the live goroutines counted (system ones left out)."""
        created: Counter[tuple[str, str]] = Counter()
        exited: Counter[tuple[str, str]] = Counter()
        creators: dict[tuple[str, str], str] = {}
        for s in snap.sites:
            k = site_name(s)
            created[k] += s.created
            exited[k] += s.exited + s.exited_unseen
            creators.setdefault(k, self.creator(s.gopc))
        total = 0
        for k in sorted(set(created) | set(members)):
            if is_system_function(k[0]):
                continue
            gs = members.get(k, [])
            before = self._last_sites.get(k, (0, 0))
            d_created = self._delta(created[k], before[0])
            d_exited = self._delta(exited[k], before[1])
            self._last_sites[k] = (created[k], exited[k])
            if not gs and not d_created and not d_exited:
                continue
            total += len(gs)
            row = out.sites.add(
                function=k[0],
                go_statement=k[1],
                creator_function=creators.get(k, ""),
                live=len(gs),
                created=d_created,
                exited=d_exited,
            )
            sent.rows.append(self._describe_members(row, snap, gs))
        return total

    def _describe_members(
        self, s: ing.SiteSummary, snap: ProcessSnapshot, gs: list[Goroutine]
    ) -> RowAges:
        """A site's ages, wait reasons and orphans, from its live goroutines; returns
        which goroutines its ages are of."""
        by_age = sorted(gs, key=lambda g: snap.ages_s.get(g.goid, 0.0))
        ages = [snap.ages_s.get(g.goid, 0.0) for g in by_age]
        p50, p90, p99, mx = _quantiles(ages)
        s.age.p50_seconds, s.age.p90_seconds = p50, p90
        s.age.p99_seconds, s.age.max_seconds = p99, mx
        if gs:
            eldest = max(gs, key=lambda g: snap.ages_s.get(g.goid, 0.0))
            s.age.max_is_lower_bound = eldest.goid in snap.ages_lower_bound
        for reason, n in Counter(g.wait_reason for g in gs if g.wait_reason).most_common(3):
            s.wait_reasons.add(reason=reason, count=n)
        orphans = [g for g in gs if g.goid in snap.orphan_goids]
        if orphans:
            s.orphans.count = len(orphans)
            eldest = max(orphans, key=lambda g: snap.ages_s.get(g.goid, 0.0))
            s.orphans.oldest_age_seconds = snap.ages_s.get(eldest.goid, 0.0)
            s.orphans.oldest_age_is_lower_bound = eldest.goid in snap.ages_lower_bound
            reasons = Counter(g.wait_reason or "" for g in orphans)
            s.orphans.dominant_wait_reason = reasons.most_common(1)[0][0]
            s.orphans.longest_blocked_seconds = max(self._blocked(snap, g) for g in orphans)
            return RowAges(quantile_goids(by_age), eldest.goid, orphans)
        return RowAges(quantile_goids(by_age), 0, [])

    def _add_drops(
        self, out: ing.ProcessSnapshot, snap: ProcessSnapshot, extra: Mapping[str, int]
    ) -> None:
        drops: Counter[str] = Counter()
        for raw, reason in TRACKER_DROPS.items():
            now = snap.dropped.get(raw, 0)
            drops[reason] += self._delta(now, self._last_drops.get(raw, 0))
            self._last_drops[raw] = now
        drops["inventory_torn_reads"] += snap.torn_reads
        for reason, n in extra.items():
            drops[reason] += n
        for reason, n in sorted(drops.items()):
            if n:
                out.drops.add(reason=reason, count=n)

    @staticmethod
    def _blocked(snap: ProcessSnapshot, g: Goroutine) -> float:
        # g.waitsince is set lazily by the GC (inventory.py): 0 means not known yet.
        if g.wait_since_ns and snap.read_ns > g.wait_since_ns:
            return (snap.read_ns - g.wait_since_ns) / 1e9
        return 0.0

    def _kept(
        self,
        snap: ProcessSnapshot,
        names: Mapping[tuple[int, int], tuple[str, str]],
        members: Mapping[tuple[str, str], list[Goroutine]],
        sent: Sent,
    ) -> list[t.Goroutine]:
        """Orphans first, then the oldest parked goroutines, up to max_kept, with stacks."""
        ages = snap.ages_s
        parked = [g for gs in members.values() for g in gs if g.status == "waiting"]
        parked.sort(key=lambda g: (g.goid not in snap.orphan_goids, -ages.get(g.goid, 0.0)))
        chosen = parked[: self.max_kept]
        if not chosen:
            return []
        try:
            stacks = walk_stacks(self.proc, chosen, KEPT_FRAMES, memo=self._stack_memo)
        except GoleashError:
            raise
        except Exception as exc:
            raise StageFailure("stacks", exc) from exc
        live = {g.goid for g in snap.goroutines}
        out: list[t.Goroutine] = []
        used: set[int] = set()
        made: dict[_TemplateKey, tuple[Stack | None, t.Goroutine]] = {}
        for g in chosen:
            fn, stmt = names[(g.gopc, g.startpc)]
            parent = snap.parents.get(g.goid, 0)
            if not (0 <= g.goid <= _U64 and 0 <= parent <= _U64):
                continue  # torn: goids are non-negative 64-bit counters
            # The template itself (one per goroutine, its own): the message's
            # extend() copies it, so a copy here would be a second one.
            m = self._template(g, fn, stmt, stacks.get(g.goid), made)
            if id(m) in used:
                m = _copy(m)  # the same goid twice (a torn read): each its own fields
            used.add(id(m))
            # What changes from one snapshot to the next of a parked goroutine (every
            # field the template does not hold, set each time):
            m.parent_goid = parent
            m.parent_exited = bool(parent) and parent not in live
            m.age_seconds = ages.get(g.goid, 0.0)
            m.age_is_lower_bound = g.goid in snap.ages_lower_bound
            m.blocked_for_seconds = self._blocked(snap, g)
            m.orphan = g.goid in snap.orphan_goids
            out.append(m)
            sent.kept.append(g)
            sent.stacks.append(stacks.get(g.goid))
        self._templates = made  # only this snapshot's: bounded by max_kept
        return out

    def _template(
        self,
        g: Goroutine,
        fn: str,
        stmt: str,
        stack: Stack | None,
        made: dict[_TemplateKey, tuple[Stack | None, t.Goroutine]],
    ) -> t.Goroutine:
        """G's message without what changes between snapshots (ages, parent, orphan),
        made once while its site, state and stack (the very Stack object the walk
        memo returns) stay the same."""
        key = (g.goid, id(stack), fn, stmt, g.status, g.wait_reason, g.gopc, g.startpc)
        found = made.get(key) or self._templates.get(key)
        if found is None or found[0] is not stack:
            pb = t.Goroutine(
                goid=g.goid,
                function=fn,
                go_statement=stmt,
                state=STATES.get(g.status, t.GOROUTINE_STATE_UNSPECIFIED),
                wait_reason=g.wait_reason or "",
                created_by=site_at(self.proc, g.gopc, g.startpc).created_by,
            )
            for f in stack.frames if stack is not None else ():
                # Read from another process: only in-range numbers reach protobuf.
                pb.stack.add(
                    function=f.function,
                    file=f.file,
                    line=f.line if 0 <= f.line <= _U32 else 0,
                    pc=f.pc if 0 <= f.pc <= _U64 else 0,
                )
            found = (stack, pb)
        made[key] = found
        return found[1]


def _copy(m: t.Goroutine) -> t.Goroutine:
    c = t.Goroutine()
    c.CopyFrom(m)
    return c


def trim_kept(batch: ing.AgentBatch, max_bytes: int) -> bool:
    """Drop individual goroutines (largest snapshots first) until the batch fits;
    False if it still does not."""
    while batch.ByteSize() > max_bytes:
        snaps = [s for s in batch.snapshots if len(s.goroutines_kept)]
        if not snaps:
            return False
        biggest = max(snaps, key=lambda s: s.ByteSize())
        keep = len(biggest.goroutines_kept) // 2
        del biggest.goroutines_kept[keep:]
    return True
