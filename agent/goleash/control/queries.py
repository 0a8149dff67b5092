"""The typed read model: what the Store knows about a selection of processes, as plain
dataclasses, for readers inside the control plane (the policy engine) and for the
gRPC servicer, which turns them into protos (`views`).

Ingest and state stay in `state.py`; this module only reads them. So far it answers
processes and function latency; creation sites, orphans, leak suspects and kept
goroutines are still read through the Store's proto-building methods.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.histogram import Histogram
from goleash.control.limits import InvalidArgument
from goleash.control.state import (
    CREATED,
    DEFAULT_QUANTILES,
    EXITED,
    PANICS,
    NotFound,
    ProcState,
    Store,
)
from goleash.control.windows import covered


@dataclass(frozen=True)
class Selection:
    """Which processes a question is about (empty fields: all)."""

    service: str = ""
    agent_id: str = ""
    pid: int = 0

    @classmethod
    def of(cls, sel: q.ProcessSelector) -> Selection:
        """From the API's selector (the servicer boundary)."""
        return cls(service=sel.service, agent_id=sel.agent_id, pid=sel.pid)


@dataclass(frozen=True)
class ProcessRow:
    """One followed process over a window."""

    info: t.ProcessInfo  # what the agent reported about it
    agent_id: str
    node_name: str
    state: int  # a goleash.v1.ProcessState number
    first_seen: float
    last_seen: float
    goroutines: int
    created: int
    exited: int
    orphans: int
    panics: int
    drops: Counter[str]
    gone_reason: str

    @property
    def running(self) -> bool:
        return self.state == q.PROCESS_STATE_RUNNING


@dataclass(frozen=True)
class ProcessList:
    window_seconds: float  # the window the counts cover
    total: int  # processes selected, before `limit`
    rows: Iterator[ProcessRow]  # computed as read: a caller may stop early


_ORDERS: dict[int, Callable[[ProcState], Any]] = {
    q.PROCESS_ORDER_UNSPECIFIED: lambda p: (p.service, p.key),
    q.PROCESS_ORDER_GOROUTINES: lambda p: (-p.goroutines, p.service, p.key),
    q.PROCESS_ORDER_ORPHANS: lambda p: (-p.orphans, -p.goroutines, p.service, p.key),
}


def processes(
    store: Store,
    sel: Selection,
    now: float,
    *,
    window_seconds: float = 0.0,
    include_gone: bool = False,
    order_by: int = q.PROCESS_ORDER_UNSPECIFIED,
    limit: int = 0,
) -> ProcessList:
    """The selected processes (NotFound for an unknown service, agent or pid)."""
    w = store.window(window_seconds)
    order = _ORDERS.get(order_by)
    if order is None:
        raise InvalidArgument(f"order_by {order_by} is not a ProcessOrder")
    procs = store.select(sel, include_gone=include_gone)
    procs.sort(key=order)

    def rows() -> Iterator[ProcessRow]:
        for p in procs[: limit or None]:
            yield _process_row(store, p, now, w)

    return ProcessList(covered(now, w, store.tiers), len(procs), rows())


def _process_row(store: Store, p: ProcState, now: float, w: float) -> ProcessRow:
    return ProcessRow(
        info=p.info,
        agent_id=p.key[0],
        node_name=store.agents[p.key[0]].identity.node_name,
        state=store.process_state(p, now),
        first_seen=p.first_seen,
        last_seen=p.last_seen,
        goroutines=p.goroutines,
        created=int(p.windows.total(now, w, CREATED)),
        exited=int(p.windows.total(now, w, EXITED)),
        orphans=p.orphans,
        panics=int(p.windows.total(now, w, PANICS)),
        drops=Counter(p.drops),
        gone_reason=p.gone_reason,
    )


@dataclass(frozen=True)
class LatencyWindow:
    """A traced function's latency over a window, merged over the selection."""

    function: str
    window_seconds: float
    processes: int  # processes that recorded it within the window
    histogram: Histogram | None  # None or empty: no calls in the window
    quantiles: tuple[tuple[float, float], ...] = field(default=())  # (quantile, seconds)

    @property
    def count(self) -> int:
        return self.histogram.count if self.histogram is not None else 0

    @property
    def mean_seconds(self) -> float:
        h = self.histogram
        return h.sum_seconds / h.count if h is not None and h.count else 0.0


def function_latency(
    store: Store,
    function: str,
    sel: Selection,
    now: float,
    *,
    window_seconds: float = 0.0,
    quantiles: Sequence[float] = (),
) -> LatencyWindow:
    """NotFound when nothing in the selection traces `function`."""
    if not function:
        raise InvalidArgument("function is required (a symbol, e.g. main.handle)")
    qs = list(quantiles) or list(DEFAULT_QUANTILES)
    for x in qs:
        if not 0 < x < 1:
            raise InvalidArgument(f"quantiles must be in (0, 1), got {x}")
    w = store.window(window_seconds)
    procs = store.select(sel)
    fn = function
    span_tiers = store.tiers
    if sel.agent_id or sel.pid:
        sources = [p.latency[fn] for p in procs if fn in p.latency]
        span_tiers = store.process_latency_tiers
    else:
        services = [store.services[sel.service]] if sel.service else store.services.values()
        sources = [svc.latency[fn] for svc in services if fn in svc.latency]
    if not sources:
        traced = sorted({f for p in procs for f in p.latency})
        listed = ", ".join(traced[:10]) + (" ..." if len(traced) > 10 else "")
        raise NotFound(
            f"no latency data for {fn!r} in the selection"
            + (f" (traced: {listed})" if traced else " (no function is traced there)")
        )
    merged: Histogram | None = None
    for hw in sources:
        merged = hw.merged(now, w, merged)
    span = covered(now, w, span_tiers)
    n = sum(1 for p in procs if fn in p.latency and p.latency[fn].last_record > now - span)
    values = merged.quantiles(qs) if merged is not None and merged.count else [0.0] * len(qs)
    return LatencyWindow(fn, span, n, merged, tuple(zip(qs, values, strict=True)))
