"""What one agent may make the control plane hold, and the check every batch passes.

An agent is untrusted: everything it sends is checked here, before the Store changes,
so a rejected batch changes nothing. Counts beyond a cap are RESOURCE_EXHAUSTED
(too much), malformed values INVALID_ARGUMENT (wrong); only the parts an agent
already trims by its own rules (kept goroutines, stack frames) are truncated here and
counted as drops, and so are names and text over their length (an executable's
name, a long symbol: refusing would lose the batch's other processes). Identities
are refused instead: agent ids, and "namespace/workload" service names, which must
follow Kubernetes' naming rules. Numbers must be finite and non-negative, histogram
buckets inside the 64-bit nanosecond range.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.histogram import MAX_SUB_BUCKET_BITS, bucket_index
from goleash.errors import GoleashError


class ControlError(GoleashError):
    """A request the control plane refuses; `status` names the gRPC status code."""

    status = "INTERNAL"


class InvalidArgument(ControlError):
    status = "INVALID_ARGUMENT"


class ResourceExhausted(ControlError):
    status = "RESOURCE_EXHAUSTED"


class NotFound(ControlError):
    status = "NOT_FOUND"


class PermissionDenied(ControlError):
    status = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Limits:
    """Caps on what the Store keeps; the defaults fit 1000 agents x 20 processes with
    room (the agent itself keeps at most 4096 sites and 200 goroutines per process)."""

    agents: int = 10_000
    processes_per_agent: int = 1_000
    sites_per_process: int = 4_096
    # A site of its own service costs about 4.5 KB (windows per process and per
    # service, the snapshot kept); a batch of 10k new sites applies in about 0.5 s.
    sites_per_agent: int = 10_000
    # The whole Store, so the control plane stays under its 1 GiB limit (the ingest
    # benchmark's fleet, 1000 agents x 20 processes x 6 sites, holds 120k sites).
    sites_total: int = 200_000
    processes_total: int = 50_000
    functions_per_process: int = 256
    functions_per_agent: int = 2_048
    drop_reasons: int = 64  # distinct reasons kept per agent and per process
    kept_goroutines: int = 1_000  # per snapshot; more are truncated and counted
    stack_depth: int = 128  # frames per goroutine; deeper stacks are truncated
    wait_reasons: int = 32  # per site
    panic_functions: int = 256  # per snapshot
    # A batch's sequence may run ahead of the last one by at most this (a week of
    # 5 s batches is 120k): a jump to 2^64-1 would make every later batch a duplicate.
    sequence_jump: int = 1_000_000
    max_sequence: int = 1 << 40  # 174k years of 5 s batches
    agent_ttl_seconds: float = 3600.0  # disconnected agents are forgotten after this


DEFAULT_LIMITS = Limits()

# string lengths (bytes of UTF-8 are at most 4x these; protobuf strings are UTF-8)
ID_CHARS = 253  # agent ids, node names: a DNS subdomain's length
FUNCTION_CHARS = 1024  # Go symbols (generic instantiations get long), wait reasons
PATH_CHARS = 4096  # PATH_MAX: go statements (file:line), executables, stack files
SHORT_CHARS = 128  # drop reasons, versions, instance and container ids
TEXT_CHARS = 1024  # free text: tracking reasons, module paths
MAX_INTERVAL_SECONDS = 3600.0

TRUNCATED_KEPT = "kept_goroutines_over_cap"
TRUNCATED_STACK = "stack_frames_over_cap"
OTHER_REASONS = "other_reasons"
TRUNCATED_TEXT = "strings_over_length"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _max_bucket_index(bits: int) -> int:
    return bucket_index((1 << 64) - 1, bits)


MAX_BUCKET_INDEX = {b: _max_bucket_index(b) for b in range(MAX_SUB_BUCKET_BITS + 1)}
_GOROUTINE_STATES = frozenset(t.GoroutineState.values())


def _text(what: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters long; at most {limit}")


def _name(what: str, value: str, limit: int = ID_CHARS) -> None:
    """Identities: bounded and free of control characters (they reach terminals)."""
    _text(what, value, limit)
    if _CONTROL.search(value):
        raise InvalidArgument(f"{what} {value[:64]!r} contains control characters")


def _finite(what: str, v: float, limit: float = math.inf) -> None:
    if not (math.isfinite(v) and 0 <= v <= limit):
        bound = f" and at most {limit:g}" if math.isfinite(limit) else ""
        raise InvalidArgument(f"{what} must be a finite number >= 0{bound}, got {v}")


def _count(what: str, n: int, cap: int) -> None:
    if n > cap:
        raise ResourceExhausted(f"{what}: {n} is over this control plane's cap of {cap}")


def check_service(name: str) -> None:
    """A service is "namespace/workload" (Kubernetes names: a DNS label, then a DNS
    subdomain) or an executable's base name (at most 253 characters, no '/', no
    control characters)."""
    if "/" in name:
        ns, _, workload = name.partition("/")
        if not _DNS_LABEL.fullmatch(ns) or not _DNS_SUBDOMAIN.fullmatch(workload):
            raise InvalidArgument(
                f"service {name[:80]!r} is not namespace/workload by Kubernetes' naming rules "
                "(lower-case letters, digits, '-' and '.', at most 63 + 253 characters)"
            )
        return
    _name("service", name)


def check_identity(a: t.AgentIdentity) -> None:
    if not a.agent_id:
        raise InvalidArgument("batch.agent.agent_id is empty: every batch names its agent")
    _name("agent.agent_id", a.agent_id)
    _name("agent.node_name", a.node_name)
    _name("agent.instance_id", a.instance_id, SHORT_CHARS)
    _name("agent.version", a.version, SHORT_CHARS)


def _clip(m: Any, field: str, limit: int) -> int:
    """Free text and names an agent read from a host (a 300-character executable name,
    a long generic symbol) are cut, not refused: refusing the batch would lose the
    other processes in it. Returns 1 when it cut."""
    v = getattr(m, field)
    if len(v) <= limit:
        return 0
    setattr(m, field, v[:limit])
    return 1


def _process(info: t.ProcessInfo) -> int:
    cut = 0
    if "/" in info.service:
        check_service(info.service)  # Kubernetes names come from the API: refused if wrong
    elif info.service:
        # an executable's base name: whatever the host had, made printable and bounded
        clean = _CONTROL.sub("?", info.service[:ID_CHARS])
        if clean != info.service:
            info.service, cut = clean, 1
    cut += _clip(info, "exe", PATH_CHARS)
    cut += _clip(info, "go_version", SHORT_CHARS)
    cut += _clip(info, "tracking_reason", TEXT_CHARS)
    cut += _clip(info, "container_id", SHORT_CHARS)
    cut += _clip(info, "module_path", TEXT_CHARS)
    if info.tracking_mode not in t.TrackingMode.values():
        raise InvalidArgument(f"process.tracking_mode {info.tracking_mode} is not a TrackingMode")
    k = info.kubernetes
    for field_name, value in (
        ("namespace", k.namespace),
        ("workload_kind", k.workload_kind),
        ("workload_name", k.workload_name),
        ("container", k.container),
        ("pod", k.pod),
        ("pod_uid", k.pod_uid),
    ):
        if value:
            _name(f"process.kubernetes.{field_name}", value)
    if k.namespace and not _DNS_LABEL.fullmatch(k.namespace):
        raise InvalidArgument(
            f"process.kubernetes.namespace {k.namespace[:80]!r} is not a DNS label"
        )
    if k.workload_name and not _DNS_SUBDOMAIN.fullmatch(k.workload_name):
        raise InvalidArgument(
            f"process.kubernetes.workload_name {k.workload_name[:80]!r} is not a DNS subdomain"
        )
    return cut


def _drops(what: str, drops: Any, cap: int) -> int:
    _count(f"{what} drop reasons", len(drops), cap)
    return sum(_clip(d, "reason", SHORT_CHARS) for d in drops)


def _histogram(fn: str, h: t.LogLinearHistogram) -> None:
    if h.sub_bucket_bits > MAX_SUB_BUCKET_BITS:
        raise InvalidArgument(
            f"latency of {fn[:80]!r}: sub_bucket_bits {h.sub_bucket_bits} is over "
            f"{MAX_SUB_BUCKET_BITS}"
        )
    top = MAX_BUCKET_INDEX[h.sub_bucket_bits]
    _count(f"latency of {fn[:80]!r}: buckets", len(h.buckets), top + 1)
    for b in h.buckets:
        if b.index > top:
            raise InvalidArgument(
                f"latency of {fn[:80]!r}: bucket index {b.index} is beyond 2^64 ns "
                f"(at most {top} with {h.sub_bucket_bits} sub-bucket bits)"
            )
    _finite(f"latency of {fn[:80]!r}: sum_seconds", h.sum_seconds)


def _goroutine(g: t.Goroutine, limits: Limits) -> int:
    if (  # the common case in one expression, as for sites
        g.ByteSize() <= FUNCTION_CHARS
        or len(g.function) <= FUNCTION_CHARS
        and len(g.go_statement) <= PATH_CHARS
        and len(g.created_by) <= FUNCTION_CHARS
        and len(g.wait_reason) <= FUNCTION_CHARS
        and all(len(f.function) <= FUNCTION_CHARS and len(f.file) <= PATH_CHARS for f in g.stack)
    ) and (
        0 <= g.age_seconds < math.inf
        and 0 <= g.blocked_for_seconds < math.inf
        and g.state in _GOROUTINE_STATES
    ):
        return 0
    cut = _clip(g, "function", FUNCTION_CHARS)
    cut += _clip(g, "go_statement", PATH_CHARS)
    cut += _clip(g, "created_by", FUNCTION_CHARS)
    cut += _clip(g, "wait_reason", FUNCTION_CHARS)
    _finite("goroutine.age_seconds", g.age_seconds)
    _finite("goroutine.blocked_for_seconds", g.blocked_for_seconds)
    if g.state not in t.GoroutineState.values():
        raise InvalidArgument(f"goroutine.state {g.state} is not a GoroutineState")
    for f in g.stack[: limits.stack_depth]:  # deeper frames are cut by `truncate`
        cut += _clip(f, "function", FUNCTION_CHARS) + _clip(f, "file", PATH_CHARS)
    return cut


def _site(s: ing.SiteSummary, limits: Limits) -> int:
    a, o = s.age, s.orphans
    # the common case in one expression (this runs for every site of every batch);
    # NaN fails every comparison, so `0 <= v < inf` also rejects it
    # (a message of at most 1024 bytes holds no string over its limit)
    if (
        s.ByteSize() <= FUNCTION_CHARS
        or len(s.function) <= FUNCTION_CHARS
        and len(s.go_statement) <= PATH_CHARS
        and len(s.creator_function) <= FUNCTION_CHARS
        and len(o.dominant_wait_reason) <= FUNCTION_CHARS
        and all(len(w.reason) <= FUNCTION_CHARS for w in s.wait_reasons)
    ) and (
        0 <= a.p50_seconds < math.inf
        and 0 <= a.p90_seconds < math.inf
        and 0 <= a.p99_seconds < math.inf
        and 0 <= a.max_seconds < math.inf
        and 0 <= o.oldest_age_seconds < math.inf
        and 0 <= o.longest_blocked_seconds < math.inf
        and len(s.wait_reasons) <= limits.wait_reasons
    ):
        return 0
    for what, v in (
        ("p50", a.p50_seconds),
        ("p90", a.p90_seconds),
        ("p99", a.p99_seconds),
        ("max", a.max_seconds),
    ):
        _finite(f"site.age.{what}_seconds", v)
    _finite("site.orphans.oldest_age_seconds", o.oldest_age_seconds)
    _finite("site.orphans.longest_blocked_seconds", o.longest_blocked_seconds)
    _count("site.wait_reasons", len(s.wait_reasons), limits.wait_reasons)
    cut = _clip(s, "function", FUNCTION_CHARS)
    cut += _clip(s, "go_statement", PATH_CHARS)
    cut += _clip(s, "creator_function", FUNCTION_CHARS)
    cut += _clip(o, "dominant_wait_reason", FUNCTION_CHARS)
    for w in s.wait_reasons:
        cut += _clip(w, "reason", FUNCTION_CHARS)
    return cut


def _snapshot(s: ing.ProcessSnapshot, limits: Limits) -> int:
    # counts first: a 300k-site batch is refused before any of its sites is read
    _count(f"pid {s.pid}: sites in one snapshot", len(s.sites), limits.sites_per_process)
    _count(f"pid {s.pid}: traced functions", len(s.latency), limits.functions_per_process)
    _count(f"pid {s.pid}: panic functions", len(s.panics), limits.panic_functions)
    cut = _drops(f"pid {s.pid}", s.drops, limits.drop_reasons)
    for site in s.sites:
        cut += _site(site, limits)
    for lat in s.latency:
        if not lat.function:
            raise InvalidArgument(f"pid {s.pid}: a latency histogram without its function")
        cut += _clip(lat, "function", FUNCTION_CHARS)
        _histogram(lat.function, lat.histogram)
    for pc in s.panics:
        cut += _clip(pc, "function", FUNCTION_CHARS)
    for g in s.goroutines_kept[: limits.kept_goroutines]:
        cut += _goroutine(g, limits)
    return cut


def check_batch(b: ing.AgentBatch, limits: Limits = DEFAULT_LIMITS) -> int:
    """Everything about a batch that needs no state; raises ControlError. Over-long
    names and text are cut in place: returns how many were."""
    check_identity(b.agent)
    if b.sequence == 0:
        raise InvalidArgument("batch.sequence is 0: sequence numbers start at 1")
    if b.sequence > limits.max_sequence:
        raise InvalidArgument(
            f"batch.sequence {b.sequence} is beyond any agent's lifetime "
            f"(at most {limits.max_sequence})"
        )
    h = b.heartbeat
    _finite("heartbeat.interval_seconds", h.interval_seconds, MAX_INTERVAL_SECONDS)
    _finite("heartbeat.uptime_seconds", h.uptime_seconds)
    _finite("heartbeat.cpu_seconds", h.cpu_seconds)
    cap = limits.processes_per_agent
    _count("processes_appeared in one batch", len(b.processes_appeared), cap)
    _count("processes_gone in one batch", len(b.processes_gone), cap)
    _count("snapshots in one batch", len(b.snapshots), cap)
    cut = _drops("agent", b.drops, limits.drop_reasons)
    for info in b.processes_appeared:
        cut += _process(info)
    for gone in b.processes_gone:
        cut += _clip(gone, "reason", TEXT_CHARS)
    for s in b.snapshots:
        cut += _snapshot(s, limits)
    return cut


def truncate(s: ing.ProcessSnapshot, limits: Limits) -> Counter[str]:
    """Cut what the agent sent beyond the kept-goroutine and stack-depth caps; the
    drop counts to add to the process."""
    cut: Counter[str] = Counter()
    extra = len(s.goroutines_kept) - limits.kept_goroutines
    if extra > 0:
        del s.goroutines_kept[limits.kept_goroutines :]
        cut[TRUNCATED_KEPT] += extra
    for g in s.goroutines_kept:
        deep = len(g.stack) - limits.stack_depth
        if deep > 0:
            del g.stack[limits.stack_depth :]
            cut[TRUNCATED_STACK] += 1
    return cut


def add_drop(counter: Counter[str], reason: str, n: int, cap: int) -> None:
    """Count `n` drops of `reason`, folding new reasons beyond `cap` into one."""
    if reason not in counter and len(counter) >= cap:
        reason = OTHER_REASONS
    counter[reason] += n
