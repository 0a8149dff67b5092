"""The Store's records: what it keeps per agent, process, creation site and service.

Also where each metric sits in their windows' rings."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import limits as caps
from goleash.control.windows import HistogramWindows, Kind, Windows

SiteKey = tuple[str, str]  # (function, go statement)
ProcKey = tuple[str, int]  # (agent id, pid)

# metric positions in the rings
CREATED, EXITED, LIVE, OLDEST = 0, 1, 2, 3  # per site
GOROUTINES, PANICS = 2, 3  # per process / service (CREATED, EXITED shared)
SITE_KINDS = (Kind.SUM, Kind.SUM, Kind.LAST, Kind.MAX)
PROC_KINDS = (Kind.SUM, Kind.SUM, Kind.LAST, Kind.SUM)


@dataclass(eq=False)
class AgentState:
    identity: t.AgentIdentity
    first_seen: float
    last_seen: float = 0.0
    instance_id: str = ""
    last_sequence: int = 0
    batches: int = 0
    duplicates: int = 0
    gaps: int = 0
    streams: int = 0
    heartbeat: t.Heartbeat = field(default_factory=t.Heartbeat)
    drops: Counter[str] = field(default_factory=Counter)
    procs: set[ProcKey] = field(default_factory=set)
    sites: int = 0  # sites its live processes hold (what the caps count)

    @property
    def interval(self) -> float:
        return self.heartbeat.interval_seconds or 5.0


@dataclass(eq=False)
class SiteState:
    """One creation site in one process.

    `summary` is the site's part of the latest snapshot, kept as the message itself:
    copying its fields at ingest cost more than reading them at query time (it keeps
    the agent's latest batch alive, about one batch per agent)."""

    creator: str
    windows: Windows
    touched: float
    summary: ing.SiteSummary | None = None  # None: no live goroutines left
    live: int = 0
    orphans: int = 0

    @property
    def oldest(self) -> float:
        return self.summary.age.max_seconds if self.summary is not None else 0.0


@dataclass(eq=False)
class ProcState:
    key: ProcKey
    info: t.ProcessInfo
    service: str
    first_seen: float
    windows: Windows
    last_seen: float = 0.0
    gone_at: float | None = None
    gone_reason: str = ""
    goroutines: int = 0
    orphans: int = 0
    sites: dict[SiteKey, SiteState] = field(default_factory=dict)
    orphan_sites: set[SiteKey] = field(default_factory=set)  # sites with orphans now
    kept: Sequence[t.Goroutine] = ()
    latency: dict[str, HistogramWindows] = field(default_factory=dict)
    drops: Counter[str] = field(default_factory=Counter)


@dataclass(eq=False)
class ServiceSite:
    creator: str
    windows: Windows
    live: int = 0


@dataclass(eq=False)
class ServiceState:
    name: str
    windows: Windows
    goroutines: int = 0
    procs: set[ProcKey] = field(default_factory=set)
    sites: dict[SiteKey, ServiceSite] = field(default_factory=dict)
    latency: dict[str, HistogramWindows] = field(default_factory=dict)


def service_of(info: t.ProcessInfo) -> str:
    """The service a process belongs to: its workload when the agent knows it, else
    its executable's name."""
    if info.service:
        return info.service  # checked by limits.check_service
    # an executable's name is whatever the host had: keep it printable and bounded
    base = os.path.basename(info.exe)[: caps.ID_CHARS]
    return caps._CONTROL.sub("?", base) or f"pid-{info.pid}"


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
