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
reported once and left alone. When its probes cannot be placed (a kernel refusing
uprobes, BPF not available) the process is still followed from its memory
("inventory-only", the reason said in the API and logs).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from goleash import __version__
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.errors import GoleashError, StageFailure, printable
from goleash.gobin.errors import (
    BinaryError,
    NotELFError,
    NotGoError,
    OffsetsUnavailableError,
    ProcessError,
    UnsupportedGoVersionError,
)
from goleash.node import DEFAULT_HEALTH_LISTEN, DEFAULT_METRICS_LISTEN  # noqa: F401
from goleash.node.discovery import Candidate, Discovery, Selector
from goleash.node.export import (
    DEFAULT_MAX_KEPT,
    LatencyDelta,
    SnapshotExporter,
    boot_time_s,
    is_system_function,
    process_info,
    service_name,
    site_name,
    trim_kept,
)
from goleash.node.metrics import (
    DEFAULT_TOP_SITES,
    AgentView,
    FunctionView,
    HealthServer,
    MetricsServer,
    ProcessView,
    SiteView,
)
from goleash.node.sender import (
    DEFAULT_MAX_BATCHES,
    BatchBuffer,
    IngestSender,
    SenderOptions,
)
from goleash.node.tracker import DEFAULT_ORPHAN_MIN_AGE_S, ProcessSnapshot, ProcessTracker
from goleash.probes.budget import OverheadBudget
from goleash.probes.goroutines import node_program
from goleash.probes.procmem import process_state, start_time
from goleash.probes.target import GoProcess
from goleash.signals import stop_on_signals

if TYPE_CHECKING:
    from goleash.node.funcwatch import FunctionWatch

log = logging.getLogger("goleash.agent")

DEFAULT_SERVER = "127.0.0.1:7070"  # the control plane's default (goleash.control)
ATTACH_ATTEMPTS = 3  # a process that keeps failing transiently is given up after these
# A process whose handling fails unexpectedly this many times (any stage) is left
# alone until its executable changes; before that, attaching is retried with backoff.
MAX_PROCESS_FAILURES = 3
RETRY_BACKOFF_S = 2.0  # doubled after each failure
# The main loop failing this many times in a row is a fault of the agent, not of one
# process: it stops with a message (exit 2) instead of spinning.
MAX_LOOP_FAILURES = 10
STAGES = ("judge", "attach", "snapshot", "inventory", "stacks", "latency", "export", "detach")
_MAX_LOGGED = 10_000  # (process, stage) pairs whose first failure was logged


@dataclass
class AgentConfig:
    """How to run the agent (CLI flags map one to one)."""

    server: str = DEFAULT_SERVER
    selector: Selector = field(default_factory=Selector)
    interval: float = 5.0
    node_name: str | None = None  # default: $NODE_NAME, else the host name
    agent_id: str | None = None  # default: node name + boot id
    funcs: tuple[str, ...] = ()
    panics: bool = False
    health_listen: str | None = DEFAULT_HEALTH_LISTEN  # None: no health endpoint
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN  # None: no /metrics
    metrics_top_sites: int = DEFAULT_TOP_SITES  # per process; the rest is one "other"
    metrics_pid_label: bool = False  # pid as a label: a new series at every restart
    otlp_endpoint: str | None = None  # also push the metrics over OTLP/gRPC there
    otlp_interval: float = 30.0
    host_root: str = "/"
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    orphan_min_age_s: float = DEFAULT_ORPHAN_MIN_AGE_S
    budget_fraction: float = 0.01
    stacks: bool = False
    buffer_batches: int = DEFAULT_MAX_BATCHES
    max_message_bytes: int = 8 * 1024 * 1024
    max_kept: int = DEFAULT_MAX_KEPT
    scan_interval: float = 1.0


# --- identity ------------------------------------------------------------------------


def _first_line(paths: Sequence[Path]) -> str:
    for p in paths:
        try:
            line = p.read_text().strip().splitlines()
        except OSError:
            continue
        if line and line[0].strip():
            return line[0].strip()
    return ""


def node_name(configured: str | None, host_root: str) -> str:
    root = Path(host_root)
    return (
        configured
        or os.environ.get("NODE_NAME")
        or _first_line([root / "etc/hostname"])
        or socket.gethostname()
    )


def agent_identity(cfg: AgentConfig) -> t.AgentIdentity:
    """agent_id: configured, else node name + this boot's id (stable while the host
    runs, new after a reboot, when every PID is new anyway)."""
    node = node_name(cfg.node_name, cfg.host_root)
    boot = _first_line(
        [
            Path(cfg.host_root) / "proc/sys/kernel/random/boot_id",
            Path("/proc/sys/kernel/random/boot_id"),
        ]
    )
    agent_id = cfg.agent_id or (f"{node}-{boot[:8]}" if boot else node)
    return t.AgentIdentity(
        agent_id=agent_id, node_name=node, instance_id=uuid.uuid4().hex, version=__version__
    )


def _own_usage() -> tuple[float, int]:
    """(CPU seconds, resident bytes) of the agent itself."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        rss_pages = 0
    return ru.ru_utime + ru.ru_stime, rss_pages * os.sysconf("SC_PAGE_SIZE")


def check_server_address(server: str) -> None:
    """A whole-agent fault, refused at start (exit 2): a control-plane address that
    can never work. gRPC target schemes (dns:///, unix:) are left to gRPC."""
    if "://" in server or server.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return
    host, sep, port = server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or any(c.isspace() for c in server) or not port.isdigit():
        raise GoleashError(f"--server {server!r}: not HOST:PORT (e.g. goleash:7070)")
    if not 0 < int(port) < 65536:
        raise GoleashError(f"--server {server!r}: port {port} is not in 1-65535")


# --- one followed process ----------------------------------------------------------------


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


def _untraceable_kind(exc: BaseException) -> str:
    if isinstance(exc, UnsupportedGoVersionError):
        return "go_version"
    if isinstance(exc, NotGoError | NotELFError):
        return "not_go"
    if isinstance(exc, OffsetsUnavailableError):
        return "offsets_unknown"
    if isinstance(exc, ProcessError):
        return "unreadable"
    if not isinstance(exc, GoleashError):
        return "errors"
    return "other"


_ERROR_DROP_PREFIX = "process_errors_"


def _alive(pid: int, start_ticks: int) -> bool:
    """The process (pid, start) still runs: not exited, reaped, reused or a zombie."""
    return start_time(pid) == start_ticks and process_state(pid) not in (None, "Z", "X")


def _runs_still(f: Followed) -> bool:
    """A followed process is still there running the executable it was attached to."""
    try:
        return _alive(f.cand.pid, f.proc.start_time) and f.proc.same_executable()
    except Exception:
        return False


# --- the agent ----------------------------------------------------------------------------


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
        self.untraceable: dict[tuple[int, int], str] = {}  # (pid, start) -> kind
        self._untraceable_counts: dict[str, int] = {}
        self._attempts: Counter[tuple[int, int]] = Counter()
        # Fault isolation: failures by stage (for /metrics and the control plane),
        # by process (to give up on one), and when a failed process may be tried again.
        self.process_errors: Counter[str] = Counter()
        self._failures: Counter[tuple[int, int]] = Counter()
        self._retry_at: dict[tuple[int, int], float] = {}
        self._logged: set[tuple[tuple[int, int], str]] = set()
        self._reported_pids: set[int] = set()
        self._pending_appeared: list[t.ProcessInfo] = []
        self._pending_gone: list[ing.ProcessGone] = []
        self._pending_snaps: list[ing.ProcessSnapshot] = []
        self._procs_view: list[ProcessView] = []
        self.health: HealthServer | None = None
        self.metrics: MetricsServer | None = None
        self.otlp: Any = None  # goleash.otlp.OtlpExporter (optional extra)

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
                if not k.startswith(_ERROR_DROP_PREFIX)
            },
            reconnects=s.reconnects,
            connected=s.connected,
            untraceable=self._untraceable_counts,
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
        return bool(self.bpf_ok and self.discovery.scans and not self._attempts)

    # --- following ------------------------------------------------------------------

    def _fault(
        self, stage: str, pid: int, exe: str, exc: BaseException, key: tuple[int, int]
    ) -> None:
        """Count one failure of one process's handling, and log the first per stage."""
        if isinstance(exc, StageFailure):
            stage, exc = exc.stage, exc.cause
        self.process_errors[stage] += 1
        # Reaches the control plane in the next batch's agent-level drops.
        self.buffer.count_drop(f"{_ERROR_DROP_PREFIX}{stage}")
        if (key, stage) in self._logged:
            log.debug("PID %d: %s failed again: %r", pid, stage, exc)
            return
        if len(self._logged) >= _MAX_LOGGED:
            self._logged.clear()
        self._logged.add((key, stage))
        log.warning(
            "PID %d (%s): %s failed: %s: %s (this process only; counted in "
            "goleash_agent_process_errors_total)",
            pid,
            printable(exe),
            stage,
            type(exc).__name__,
            printable(str(exc))[:300],
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )

    def _judge_failed(self, pid: int, exe: str, exc: BaseException, key: tuple[int, int]) -> None:
        self._fault("judge", pid, exe, exc, key)

    def _failed(self, c: Candidate, stage: str, exc: BaseException) -> None:
        """An unexpected failure while attaching to C: retried later with backoff,
        given up after MAX_PROCESS_FAILURES, forgotten quietly if C is gone."""
        self._fault(stage, c.pid, c.exe, exc, c.key)
        if not _alive(c.pid, c.start_ticks):
            self._forget_key(c.key)
            self.discovery.forget(c.pid)
            return
        self._failures[c.key] += 1
        n = self._failures[c.key]
        if n >= MAX_PROCESS_FAILURES:
            self._retry_at.pop(c.key, None)
            self._untraceable(c, exc)
        else:
            self._retry_at[c.key] = time.monotonic() + RETRY_BACKOFF_S * 2 ** (n - 1)
            self.discovery.forget(c.pid, retry=True)

    def _forget_key(self, key: tuple[int, int]) -> None:
        self._attempts.pop(key, None)
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)

    def _untraceable(self, c: Candidate, exc: BaseException) -> None:
        kind = _untraceable_kind(exc)
        if c.key not in self.untraceable:
            log.warning("not tracing PID %d (%s): %s", c.pid, printable(c.exe), exc)
        self.untraceable[c.key] = kind
        self._failures.pop(c.key, None)
        self._untraceable_counts = dict(Counter(self.untraceable.values()))
        self._attempts.pop(c.key, None)
        self.discovery.forget(c.pid)

    def _start_tracker(self, proc: GoProcess) -> ProcessTracker:
        cfg = self.cfg
        kw = {
            "budget": OverheadBudget(cpu_fraction=cfg.budget_fraction),
            "orphan_min_age_s": cfg.orphan_min_age_s,
        }
        if self.bpf_ok:
            tracker = None
            try:
                tracker = ProcessTracker(proc, program=self.goroutine_program, **kw)  # type: ignore[arg-type]
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
            why = f"BPF unavailable on this host: {self.bpf_problem}"
        tracker = ProcessTracker(proc, use_probes=False, **kw)  # type: ignore[arg-type]
        tracker.start()
        tracker.mode_reason = why
        log.warning("PID %d: %s; following it from its memory only", proc.pid, why)
        return tracker

    def _start_funcs(self, f: Followed) -> None:
        from goleash.node.funcwatch import FunctionWatch

        try:
            w = FunctionWatch(
                f.proc,
                self.cfg.funcs,
                interval=self.cfg.interval,
                budget_fraction=self.cfg.budget_fraction,
                panics=self.cfg.panics,
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

    def follow(self, c: Candidate) -> Followed | None:
        """Attach to a new candidate; None when it cannot be (reported) or not yet.
        Never raises: whatever goes wrong is this process's failure alone."""
        retry_at = self._retry_at.get(c.key)
        if retry_at is not None and time.monotonic() < retry_at:
            self.discovery.forget(c.pid, retry=True)  # backing off: judged again later
            return None
        try:
            return self._follow(c)
        except Exception as exc:  # a bug or hostile input: this process only
            self._failed(c, "attach", exc)
            return None

    def _follow(self, c: Candidate) -> Followed | None:
        try:
            proc = GoProcess.attach(c.pid)
        except ProcessError as exc:
            self._retry_or_give_up(c, exc)
            return None
        except BinaryError as exc:
            self._untraceable(c, exc)
            return None
        try:
            tracker = self._start_tracker(proc)
        except ProcessError as exc:
            proc.close()
            self._retry_or_give_up(c, exc)
            return None
        except GoleashError as exc:
            proc.close()
            self._untraceable(c, exc)
            return None
        except BaseException:
            proc.close()
            raise
        self._attempts.pop(c.key, None)
        self._retry_at.pop(c.key, None)
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
            self._start_funcs(f)
        log.info(
            "following PID %d %s (%s, service %s): %s",
            c.pid,
            printable(c.exe),
            c.go_version,
            service,
            tracker.mode if tracker.mode == "probes" else tracker.mode_reason,
        )
        return f

    def _retry_or_give_up(self, c: Candidate, exc: ProcessError) -> None:
        self._attempts[c.key] += 1
        if not _alive(c.pid, c.start_ticks):
            self._attempts.pop(c.key, None)
            self.discovery.forget(c.pid)
        elif self._attempts[c.key] >= ATTACH_ATTEMPTS:
            self._untraceable(c, exc)
        else:
            self.discovery.forget(c.pid, retry=True)  # young processes: runtime not up yet

    def _forget_vanished(self) -> None:
        """Processes that could not be traced (or were waiting for a retry) and exited."""
        gone = [k for k in (*self.untraceable, *self._attempts) if start_time(k[0]) != k[1]]
        gone += [k for k in (*self._failures, *self._retry_at) if start_time(k[0]) != k[1]]
        for k in gone:
            self._forget_key(k)
            if self.untraceable.pop(k, None) is not None:
                self._untraceable_counts = dict(Counter(self.untraceable.values()))

    def _info(self, c: Candidate, service: str, tracker: ProcessTracker) -> t.ProcessInfo:
        return process_info(
            c, service=service, boot_s=self.boot_s, mode=tracker.mode, reason=tracker.mode_reason
        )

    # --- snapshots -------------------------------------------------------------------

    def _snapshot(self, f: Followed) -> ing.ProcessSnapshot | None:
        """This interval's message for one process; None if it exited (finished) or
        failed (counted; after MAX_PROCESS_FAILURES it is no longer followed)."""
        try:
            return self._snapshot_unguarded(f)
        except Exception as exc:
            if not _runs_still(f):
                self.finish(f.cand.pid, "exited")  # gone mid-read: quietly
            elif isinstance(exc, ProcessError):
                self.buffer.count_drop("snapshot_failed")  # a torn read; next interval
            else:
                self._fault("snapshot", f.cand.pid, f.cand.exe, exc, f.cand.key)
                self._failures[f.cand.key] += 1
                if self._failures[f.cand.key] >= MAX_PROCESS_FAILURES:
                    self.finish(f.cand.pid, "untraceable: repeated errors")
                    self.untraceable[f.cand.key] = "errors"
                    self._untraceable_counts = dict(Counter(self.untraceable.values()))
            return None

    def _snapshot_unguarded(self, f: Followed) -> ing.ProcessSnapshot | None:
        snap = f.tracker.snapshot()
        f.last = snap
        info = self._info(f.cand, f.service, f.tracker)
        if info.tracking_mode != f.info.tracking_mode:  # e.g. the overhead governor
            f.info = info
            self._pending_appeared.append(info)  # a changed process is announced again
        return self._message(f, snap, keep=True)

    def _message(self, f: Followed, snap: ProcessSnapshot, *, keep: bool) -> ing.ProcessSnapshot:
        latency: list[LatencyDelta] = []
        panics: dict[str, int] = {}
        not_timed: dict[str, int] = {}
        if f.funcs is not None:
            try:
                latency, panics, not_timed = f.funcs.take()
            except Exception as exc:  # the goroutine numbers still go out
                self._fault("latency", f.cand.pid, f.cand.exe, exc, f.cand.key)
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
        self._forget_key(f.cand.key)
        try:
            if f.last is not None:
                final = f.tracker.final_snapshot()
                self._pending_snaps.append(self._message(f, final, keep=False))
        except Exception as exc:
            self._fault("snapshot", pid, f.cand.exe, exc, f.cand.key)
        finally:
            try:
                f.close()
            except Exception as exc:
                self._fault("detach", pid, f.cand.exe, exc, f.cand.key)
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
                procs.append(self._process_view(f))
            except Exception as exc:
                self._fault("export", f.cand.pid, f.cand.exe, exc, f.cand.key)
        self._procs_view = procs

    def _process_view(self, f: Followed) -> ProcessView:
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

    def step(self, *, periodic: bool) -> None:
        """One scan; one batch when something appeared or went, or when `periodic`."""
        result = self.discovery.scan()
        for pid, _start in result.vanished:
            self.finish(pid, "exited")
        self._forget_vanished()
        first_snaps = []
        for c in result.appeared:
            f = self.follow(c)
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
        elif self._pending_appeared or self._pending_gone or first_snaps:
            self._emit(first_snaps)
        self._update_view()
        if self.cfg.selector.pids and self.discovery.scans == 1:
            self._report_missing_pids()
        if self.health is not None:
            self.health.set_ready(self.ready())

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
                    self.process_errors["agent"] += 1
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
