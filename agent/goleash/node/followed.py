"""One followed process: its tracker, exporter and function watch, how the tracker
and the watch are started, and the process's view for /metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from goleash.api.goleash.v1 import types_pb2 as t
from goleash.errors import GoleashError
from goleash.gobin.errors import ProcessError
from goleash.node.agentconfig import AgentConfig
from goleash.node.discovery import Candidate
from goleash.node.export import SnapshotExporter, is_system_function, site_name
from goleash.node.faults import alive
from goleash.node.metrics import FunctionView, ProcessView, SiteView
from goleash.node.tracker import ProcessSnapshot, ProcessTracker
from goleash.probes.budget import OverheadBudget
from goleash.probes.goroutines import GoroutineProgram
from goleash.probes.target import GoProcess

if TYPE_CHECKING:
    from goleash.node.funcwatch import FunctionWatch

log = logging.getLogger("goleash.agent")


@dataclass(eq=False)
class Followed:
    cand: Candidate
    proc: GoProcess
    tracker: ProcessTracker
    exporter: SnapshotExporter
    service: str
    info: t.ProcessInfo
    funcs: FunctionWatch | None = None  # with --func / --panics (imported only then)
    last: ProcessSnapshot | None = None

    def close(self) -> None:
        # The uprobes first: whatever else fails, none may stay in the target.
        try:
            self.tracker.close()
        finally:
            try:
                if self.funcs is not None:
                    self.funcs.close()
            finally:
                self.proc.close()


def runs_still(f: Followed) -> bool:
    """A followed process is still there running the executable it was attached to."""
    try:
        return alive(f.cand.pid, f.proc.start_time) and f.proc.same_executable()
    except Exception:
        return False


def start_tracker(
    proc: GoProcess,
    cfg: AgentConfig,
    program: GoroutineProgram,
    *,
    bpf_ok: bool,
    bpf_problem: str,
) -> ProcessTracker:
    """PROC's tracker, with probes from the shared PROGRAM when they can be placed,
    else from its memory only (the reason kept as the tracker's mode_reason)."""
    kw = {
        "budget": OverheadBudget(cpu_fraction=cfg.budget_fraction),
        "orphan_min_age_s": cfg.orphan_min_age_s,
    }
    if bpf_ok:
        kw["lifetimes"] = cfg.lifetimes
    if bpf_ok:
        tracker = None
        try:
            tracker = ProcessTracker(proc, program=program, **kw)  # type: ignore[arg-type]
            tracker.start()
            return tracker
        except ProcessError:
            if tracker is not None:
                tracker.close()
            raise
        except GoleashError as exc:
            if tracker is not None:
                tracker.close()
            why = f"uprobes could not be placed: {exc}"
        except BaseException:
            if tracker is not None:
                tracker.close()  # a compiled BPF program must not outlive a failure
            raise
    else:
        why = f"BPF unavailable on this host: {bpf_problem}"
    tracker = ProcessTracker(proc, use_probes=False, **kw)  # type: ignore[arg-type]
    tracker.start()
    tracker.mode_reason = why
    log.warning("PID %d: %s; following it from its memory only", proc.pid, why)
    return tracker


def start_funcs(f: Followed, cfg: AgentConfig) -> None:
    """Time --func functions and count --panics in F; without them on any failure."""
    from goleash.node.funcwatch import FunctionWatch

    try:
        w = FunctionWatch(
            f.proc,
            cfg.funcs,
            interval=cfg.interval,
            budget_fraction=cfg.budget_fraction,
            panics=cfg.panics,
        )
        for why in w.missing:
            log.info("PID %d (%s): --func: %s", f.proc.pid, f.service, why)
        for r in w.resolutions:
            log.info("PID %d (%s): timing %s", f.proc.pid, f.service, r.describe())
        w.start()
        if not f.proc.same_executable():  # exec'd or gone: no probe may stay
            w.close()
            return
    except GoleashError as exc:
        log.warning("PID %d (%s): no function latency/panics: %s", f.proc.pid, f.service, exc)
        return
    except Exception:  # a bug here must not cost the goroutine tracking
        log.exception("PID %d (%s): no function latency/panics", f.proc.pid, f.service)
        return
    f.funcs = w


def process_view(f: Followed) -> ProcessView:
    """F's last snapshot as /metrics shows it: user sites only, summed by name."""
    snap = f.last
    sites: dict[tuple[str, str], SiteView] = {}
    for s in snap.sites if snap is not None else ():
        if is_system_function(s.function):
            continue
        k = site_name(s)
        v = sites.setdefault(k, SiteView(k[0], k[1], 0, 0, 0, 0))
        v.live += s.live
        v.created += s.created
        v.exited += s.exited + s.exited_unseen
        v.orphans += s.orphans
    functions: list[FunctionView] = []
    panics: dict[str, int] = {}
    if f.funcs is not None:
        functions = [
            FunctionView(fn, tot.buckets, tot.count, tot.sum_ns, tot.timed)
            for fn, tot in f.funcs.totals_copy().items()
        ]
        panics = dict(f.funcs.panic_totals)
    return ProcessView(
        pid=f.cand.pid,
        service=f.service,
        mode=f.tracker.mode,
        goroutines=sum(v.live for v in sites.values()),
        sites=list(sites.values()),
        probe_hits=dict(snap.probe_hits) if snap else {},
        dropped=dict(snap.dropped) if snap else {},
        functions=functions,
        panics=panics,
        namespace=f.info.kubernetes.namespace,
        pod=f.info.kubernetes.pod,
        container=f.info.kubernetes.container,
        module=f.info.module_path,
    )
