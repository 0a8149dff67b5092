"""The node agent: follow the selected Go processes of a host and report them.

One loop on the main thread: scan /proc every `scan_interval` (discovery.py), start a
ProcessTracker for each selected Go process that appears, finish the ones that exit
(a final snapshot with the kernel's counts up to the exit, then ProcessGone, then
every uprobe detached), and every `interval` snapshot them all into one AgentBatch.
A process that appears or exits also gets a batch at once, so the control plane
learns of it within a scan, not an interval. Batches go to the control plane through
the sender (sender.py: bounded buffer, reconnects); the node package never imports
the control plane, only the API messages (DESIGN.md).

A process goleash cannot trace (not Go after all, Go < 1.17, no offsets for it) is
reported once and left alone (faults.py). When its probes cannot be placed (a kernel
refusing uprobes, BPF not available) the process is still followed from its memory
("inventory-only", the reason said in the API and logs; followed.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.errors import GoleashError, StageFailure, printable
from goleash.gobin.errors import BinaryError, ProcessError
from goleash.gobin.shared import SHARED
from goleash.node.agentconfig import AgentConfig, check_server_address
from goleash.node.discovery import Candidate, Discovery
from goleash.node.export import (
    LatencyDelta,
    SnapshotExporter,
    boot_time_s,
    process_info,
    service_name,
    trim_kept,
)
from goleash.node.faults import ERROR_DROP_PREFIX, ProcessFaults
from goleash.node.followed import (
    Followed,
    process_view,
    runs_still,
    start_funcs,
    start_tracker,
)
from goleash.node.identity import agent_identity
from goleash.node.metrics import AgentView, HealthServer, MetricsServer, ProcessView
from goleash.node.reclaim import Reclaimer
from goleash.node.sender import BatchBuffer, IngestSender, SenderOptions
from goleash.node.tracker import ProcessSnapshot, ProcessTracker
from goleash.probes.goroutines import node_program
from goleash.probes.target import GoProcess
from goleash.signals import stop_on_signals

log = logging.getLogger("goleash.agent")

# The main loop failing this many times in a row is a fault of the agent, not of one
# process: it stops with a message (exit 2) instead of spinning.
MAX_LOOP_FAILURES = 10


def _own_usage() -> tuple[float, int]:
    """(CPU seconds, resident bytes) of the agent itself."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        rss_pages = 0
    return ru.ru_utime + ru.ru_stime, rss_pages * os.sysconf("SC_PAGE_SIZE")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        if not (0 < config.interval < float("inf")):
            raise GoleashError("--interval must be a positive number of seconds")
        check_server_address(config.server)
        self.cfg = config
        self.identity = agent_identity(config)
        self.discovery = Discovery(
            config.selector, host_root=config.host_root, on_error=self._judge_failed
        )
        self.buffer = BatchBuffer(max_batches=config.buffer_batches)
        self.faults = ProcessFaults(self.discovery, self.buffer)
        self.sender = IngestSender(
            SenderOptions(
                server=config.server,
                token=config.token,
                tls_ca=config.tls_ca,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
                max_message_bytes=config.max_message_bytes,
            ),
            self.buffer,
            # batches sent this recently before a broken stream are sent again
            inflight_s=2 * config.interval + 1,
        )
        self.followed: dict[int, Followed] = {}
        self.sequence = 0
        self.started = time.monotonic()
        self.boot_s = boot_time_s()
        self.bpf_ok = False
        self.bpf_problem = ""
        # One compiled goroutines program for every followed process (compiled when
        # the first one is attached): a compile per process cost ~0.6 CPU-s and
        # ~30 MB each.
        self.goroutine_program = node_program(stacks=config.stacks)
        self._compiling: threading.Thread | None = None
        # What exited processes' analyses leave in reference cycles: collected soon.
        self.reclaimer = Reclaimer(SHARED)
        self._reported_pids: set[int] = set()
        self._pending_appeared: list[t.ProcessInfo] = []
        self._pending_gone: list[ing.ProcessGone] = []
        self._pending_snaps: list[ing.ProcessSnapshot] = []
        self._procs_view: list[ProcessView] = []
        self.health: HealthServer | None = None
        self.metrics: MetricsServer | None = None
        self.otlp: Any = None  # goleash.otlp.OtlpExporter (optional extra)

    @property
    def process_errors(self) -> Counter[str]:
        """Failures of one process's handling, by stage (faults.py)."""
        return self.faults.process_errors

    @property
    def untraceable(self) -> dict[tuple[int, int], str]:
        """(pid, start) -> why goleash does not trace that process (faults.py)."""
        return self.faults.untraceable

    # --- endpoints -----------------------------------------------------------------

    def view(self) -> AgentView:
        """For the metrics thread: only attributes the main loop replaces whole."""
        s = self.sender.stats
        return AgentView(
            processes=self._procs_view,
            batches=self.sequence,
            batches_sent=s.batches_sent,
            buffered=len(self.buffer),
            batch_drops={
                k: v
                for k, v in self.buffer.drop_counts().items()
                if not k.startswith(ERROR_DROP_PREFIX)
            },
            reconnects=s.reconnects,
            connected=s.connected,
            untraceable=self.faults.untraceable_counts,
            scans=self.discovery.scans,
            process_errors=dict(self.process_errors),
        )

    def open_endpoints(self) -> None:
        if self.cfg.health_listen:
            self.health = HealthServer(self.cfg.health_listen)
        if self.cfg.metrics_listen:
            self.metrics = MetricsServer(
                self.cfg.metrics_listen,
                self.view,
                top_sites=self.cfg.metrics_top_sites,
                pid_label=self.cfg.metrics_pid_label,
            )
        if self.cfg.otlp_endpoint:
            from goleash.node.metrics import agent_registry
            from goleash.otlp import OtlpExporter

            registry = agent_registry(
                self.view,
                top_sites=self.cfg.metrics_top_sites,
                pid_label=self.cfg.metrics_pid_label,
            )
            self.otlp = OtlpExporter(
                self.cfg.otlp_endpoint,
                registry,
                service_name="goleash-agent",
                interval=self.cfg.otlp_interval,
                resource={"host.name": self.identity.node_name},
            ).start()

    def _check_bpf(self) -> None:
        from goleash.probes.selfcheck import BPFUnavailableError, check_bpf

        try:
            check_bpf()
            self.bpf_ok = True
        except BPFUnavailableError as exc:
            self.bpf_problem = str(exc)
            log.error("%s; following processes from their memory only (not ready)", exc)

    def ready(self) -> bool:
        """BPF works here, /proc was scanned, and no selected process is still waiting
        for its attach to be retried (see metrics.py for the choice)."""
        return bool(self.bpf_ok and self.discovery.scans and not self.faults.attempts)

    # --- following ------------------------------------------------------------------

    def _judge_failed(self, pid: int, exe: str, exc: BaseException, key: tuple[int, int]) -> None:
        self.faults.judge_failed(pid, exe, exc, key)

    def follow(self, c: Candidate) -> Followed | None:
        """Attach to a new candidate; None when it cannot be (reported) or not yet.
        Never raises: whatever goes wrong is this process's failure alone."""
        proc = self.open(c)
        return None if proc is None else self.start(c, proc)

    def open(self, c: Candidate) -> GoProcess | None:
        """C's process with its executable analysed (shared, gobin.shared); None when
        it cannot be (reported) or not yet. Never raises."""
        if self.faults.backing_off(c):
            return None
        try:
            return GoProcess.attach(c.pid)
        except ProcessError as exc:
            self.faults.retry_or_give_up(c, exc)
        except BinaryError as exc:
            self.faults.mark_untraceable(c, exc)
        except Exception as exc:  # a bug or hostile input: this process only
            self.faults.failed(c, "attach", exc)
        return None

    def start(self, c: Candidate, proc: GoProcess) -> Followed | None:
        """Probes and tracker for an opened process; None when it cannot be followed
        (reported; PROC closed). Never raises."""
        try:
            return self._start(c, proc)
        except Exception as exc:  # a bug or hostile input: this process only
            self.faults.failed(c, "attach", exc)
            return None

    def _start(self, c: Candidate, proc: GoProcess) -> Followed | None:
        if self.bpf_ok:
            self._program_compiled()
        try:
            tracker = start_tracker(
                proc,
                self.cfg,
                self.goroutine_program,
                bpf_ok=self.bpf_ok,
                bpf_problem=self.bpf_problem,
            )
        except ProcessError as exc:
            proc.close()
            self.faults.retry_or_give_up(c, exc)
            return None
        except GoleashError as exc:
            proc.close()
            self.faults.mark_untraceable(c, exc)
            return None
        except BaseException:
            proc.close()
            raise
        self.faults.attached(c.key)
        service = service_name(c)
        f = Followed(
            c,
            proc,
            tracker,
            SnapshotExporter(proc, max_kept=self.cfg.max_kept),
            service,
            self._info(c, service, tracker),
        )
        if self.cfg.funcs or self.cfg.panics:
            start_funcs(f, self.cfg)
        log.info(
            "following PID %d %s (%s, service %s): %s",
            c.pid,
            printable(c.exe),
            c.go_version,
            service,
            tracker.mode if tracker.mode == "probes" else tracker.mode_reason,
        )
        return f

    # --- the one goroutines program ---------------------------------------------------

    def _compile_in_background(self) -> None:
        """Start loading the goroutines program (from the node's image cache, or a
        compile in a child process when the cache is cold: this thread only waits)
        while the main thread analyses executables: the two overlap instead of adding
        up."""
        if self._compiling is not None or self.goroutine_program.compiled:
            return
        self._compiling = threading.Thread(
            target=self._compile_program, name="goleash-compile", daemon=True
        )
        self._compiling.start()

    def _compile_program(self) -> None:
        # A failure is kept by the program and raised again by register(): each
        # process then says why it is followed from its memory only.
        with contextlib.suppress(Exception):
            self.goroutine_program.compile()

    def _program_compiled(self) -> None:
        """Wait for a background compile: register() must not start a second one."""
        if self._compiling is not None:
            self._compiling.join()
            self._compiling = None

    def _info(self, c: Candidate, service: str, tracker: ProcessTracker) -> t.ProcessInfo:
        return process_info(
            c, service=service, boot_s=self.boot_s, mode=tracker.mode, reason=tracker.mode_reason
        )

    # --- snapshots -------------------------------------------------------------------

    def _snapshot(self, f: Followed) -> ing.ProcessSnapshot | None:
        """This interval's message for one process; None if it exited (finished) or
        failed (counted; after faults.MAX_PROCESS_FAILURES it is no longer followed)."""
        try:
            return self._snapshot_unguarded(f)
        except Exception as exc:
            if not runs_still(f):
                self.finish(f.cand.pid, "exited")  # gone mid-read: quietly
            elif isinstance(exc, ProcessError):
                self.buffer.count_drop("snapshot_failed")  # a torn read; next interval
            elif self.faults.failed_again("snapshot", f.cand.pid, f.cand.exe, exc, f.cand.key):
                self.finish(f.cand.pid, "untraceable: repeated errors")
                self.faults.gave_up(f.cand.key)
            return None

    def _snapshot_unguarded(self, f: Followed) -> ing.ProcessSnapshot | None:
        snap = f.tracker.snapshot()
        f.last = snap
        mode = (
            t.TRACKING_MODE_PROBES if f.tracker.mode == "probes" else t.TRACKING_MODE_INVENTORY_ONLY
        )
        if mode != f.info.tracking_mode:  # e.g. the overhead governor
            f.info = self._info(f.cand, f.service, f.tracker)
            self._pending_appeared.append(f.info)  # a changed process is announced again
        return self._message(f, snap, keep=True)

    def _message(self, f: Followed, snap: ProcessSnapshot, *, keep: bool) -> ing.ProcessSnapshot:
        latency: list[LatencyDelta] = []
        panics: dict[str, int] = {}
        not_timed: dict[str, int] = {}
        if f.funcs is not None:
            try:
                latency, panics, not_timed = f.funcs.take()
            except Exception as exc:  # the goroutine numbers still go out
                self.faults.fault("latency", f.cand.pid, f.cand.exe, exc, f.cand.key)
        try:
            return f.exporter.message(
                snap, latency=latency, panics=panics, extra_drops=not_timed, keep=keep
            )
        except ProcessError:
            # its memory vanished while stacks were read: send the numbers without them
            return f.exporter.message(snap, latency=latency, panics=panics, keep=False)
        except StageFailure:
            raise
        except Exception as exc:
            raise StageFailure("export", exc) from exc

    def finish(self, pid: int, reason: str) -> None:
        """A followed process exited (or is no longer selected): last numbers, gone."""
        f = self.followed.pop(pid, None)
        if f is None:
            return
        self.discovery.forget(pid)
        self.faults.forget_key(f.cand.key)
        try:
            if f.last is not None:
                final = f.tracker.final_snapshot()
                self._pending_snaps.append(self._message(f, final, keep=False))
        except Exception as exc:
            self.faults.fault("snapshot", pid, f.cand.exe, exc, f.cand.key)
        finally:
            try:
                f.close()
            except Exception as exc:
                self.faults.fault("detach", pid, f.cand.exe, exc, f.cand.key)
        self._pending_gone.append(
            ing.ProcessGone(
                pid=pid, start_time_unix_nano=f.info.start_time_unix_nano, reason=reason
            )
        )
        log.info("PID %d (%s) %s; probes detached", pid, f.service, reason)

    def _report_missing_pids(self) -> None:
        """Explicit --pid values that are not followed: say why, once each."""
        for pid in sorted(self.cfg.selector.pids - self._reported_pids):
            if pid in self.followed:
                continue
            self._reported_pids.add(pid)
            if any(k[0] == pid for k in self.untraceable):
                continue
            try:
                GoProcess.attach(pid).close()
            except GoleashError as exc:
                log.warning("--pid %d: %s", pid, exc)
            except Exception as exc:
                log.warning("--pid %d: cannot be read: %s: %s", pid, type(exc).__name__, exc)
            else:
                log.warning("--pid %d: not followed: it does not match the other criteria", pid)

    # --- batches ---------------------------------------------------------------------------

    def _emit(self, snapshots: list[ing.ProcessSnapshot]) -> None:
        self.sequence += 1
        b = ing.AgentBatch(
            agent=self.identity, sequence=self.sequence, time_unix_nano=time.time_ns()
        )
        cpu, rss = _own_usage()
        hb = b.heartbeat
        hb.interval_seconds = self.cfg.interval
        hb.uptime_seconds = time.monotonic() - self.started
        hb.tracked_processes = len(self.followed)
        hb.cpu_seconds, hb.rss_bytes = cpu, rss
        b.processes_appeared.extend(self._pending_appeared)
        b.processes_gone.extend(self._pending_gone)
        b.snapshots.extend(self._pending_snaps)
        b.snapshots.extend(snapshots)
        self._pending_appeared, self._pending_gone, self._pending_snaps = [], [], []
        if not trim_kept(b, self.cfg.max_message_bytes - 4096):
            del b.snapshots[:]
            self.buffer.count_drop("snapshots_too_large")
        self.buffer.put(b, [f.info for f in self.followed.values()])

    def _update_view(self) -> None:
        procs = []
        for f in self.followed.values():
            try:
                procs.append(process_view(f))
            except Exception as exc:
                self.faults.fault("export", f.cand.pid, f.cand.exe, exc, f.cand.key)
        self._procs_view = procs

    def step(self, *, periodic: bool) -> None:
        """One scan; one batch when something appeared or went, or when `periodic`."""
        result = self.discovery.scan(check_exec=periodic)
        for pid, _start in result.vanished:
            self.finish(pid, "exited")
        self.faults.forget_vanished()
        first_snaps = []
        if result.appeared and self.bpf_ok:
            self._compile_in_background()
        # Every new executable is analysed while the program compiles; then the probes.
        opened = [(c, p) for c in result.appeared if (p := self.open(c)) is not None]
        for c, proc in opened:
            f = self.start(c, proc)
            if f is None:
                continue
            self.followed[c.pid] = f
            self._pending_appeared.append(f.info)
            if not periodic:
                msg = self._snapshot(f)
                if msg is not None:
                    first_snaps.append(msg)
        if periodic:
            snaps = [m for f in list(self.followed.values()) if (m := self._snapshot(f))]
            self._emit(snaps)
            # The executables' pages the snapshots read (pclntab for names and
            # stacks) go back to the page cache: ~1 MB per binary otherwise.
            SHARED.release_pages()
        elif self._pending_appeared or self._pending_gone or first_snaps:
            self._emit(first_snaps)
        # A process's view changes with its snapshots and when processes come and go;
        # only function latency totals (a thread of their own) change in between.
        if periodic or result.appeared or result.vanished or self.cfg.funcs:
            self._update_view()
        if self.cfg.selector.pids and self.discovery.scans == 1:
            self._report_missing_pids()
        if self.health is not None:
            self.health.set_ready(self.ready())
        self.reclaimer.step()

    def run(self, stop: threading.Event, *, on_started: Callable[[], None] | None = None) -> int:
        """Until `stop` is set. Endpoints must be open (open_endpoints) if wanted."""
        self._check_bpf()
        self.sender.start()
        if on_started is not None:
            on_started()
        next_batch = time.monotonic()
        failed_in_a_row = 0
        try:
            while not stop.is_set():
                now = time.monotonic()
                periodic = now >= next_batch
                if periodic:
                    # the next one an interval later; after a stall, no burst to catch up
                    next_batch = max(next_batch + self.cfg.interval, now)
                try:
                    self.step(periodic=periodic)
                    failed_in_a_row = 0
                except GoleashError:
                    raise  # a fault of the whole agent (configuration, environment)
                except Exception as exc:
                    failed_in_a_row += 1
                    self.faults.process_errors["agent"] += 1
                    log.exception("agent loop failed (%d in a row)", failed_in_a_row)
                    if failed_in_a_row >= MAX_LOOP_FAILURES:
                        raise GoleashError(
                            f"the agent's main loop failed {failed_in_a_row} times in a row "
                            f"(last: {type(exc).__name__}: {exc}); stopping"
                        ) from exc
                wait = min(next_batch, time.monotonic() + self.cfg.scan_interval)
                stop.wait(max(0.0, wait - time.monotonic()))
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        n = len(self.followed)
        for pid in list(self.followed):
            f = self.followed.pop(pid)
            try:
                f.close()
            except Exception:
                log.exception("PID %d: detaching failed", pid)
        log.info("stopping: probes detached from %d process(es)", n)
        self._program_compiled()  # a compile still running must not outlive its program
        self.discovery.close()
        try:
            self.goroutine_program.close()
        except Exception:
            log.exception("unloading the goroutines program failed")
        self.sender.stop(flush_timeout=2.0)
        if self.health is not None:
            self.health.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.otlp is not None:
            self.otlp.stop()


def describe(agent: Agent) -> str:
    cfg = agent.cfg
    parts = [
        f"agent {agent.identity.agent_id} on {agent.identity.node_name}",
        f"streaming to {cfg.server} every {cfg.interval:g}s",
    ]
    if agent.health is not None:
        parts.append(f"health on {agent.health.address}")
    if agent.metrics is not None:
        parts.append(f"metrics on http://{agent.metrics.address}/metrics")
    sel = cfg.selector
    parts.append(
        "following every Go process"
        if sel.everything
        else "following "
        + ", ".join(
            x
            for x in (
                f"pids {sorted(sel.pids)}" if sel.pids else "",
                f"exe {list(sel.exe_globs)}" if sel.exe_globs else "",
                f"cgroups {list(sel.cgroup_globs)}" if sel.cgroup_globs else "",
                f"pods {sorted(sel.pod_uids)}" if sel.pod_uids else "",
            )
            if x
        )
    )
    return "; ".join(parts)


def serve(config: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT (what `goleash agent` does)."""
    logging.basicConfig(level=logging.INFO, format="goleash agent: %(message)s")
    with stop_on_signals() as stop:
        agent = Agent(config)
        agent.open_endpoints()
        return agent.run(stop, on_started=lambda: log.info("%s", describe(agent)))
