"""A control plane's Store, event log and policy engine fed by a fake agent, with time
passed in: the policy engine's tests drive scenarios minutes long in milliseconds."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.engine import InlineRunner, PolicyEngine
from goleash.control.events import EventLog, EventQuery, open_db
from goleash.control.histogram import from_values
from goleash.control.policy import PolicyStore
from goleash.control.state import Store

T0 = 1_000_000.0


class World:
    """A control plane's Store, event log and policy store, fed by a fake agent."""

    def __init__(
        self, db: str = ":memory:", report_dir: str | None = None, external_url: str = ""
    ) -> None:
        self.now = T0
        conn = open_db(db)
        self.events = EventLog(conn, clock=lambda: self.now)
        self.policies = PolicyStore(conn, clock=lambda: self.now)
        self.store = Store(self.events.append)
        self.seq = 0
        self.pids: dict[str, int] = {}
        self.agent = t.AgentIdentity(agent_id="a1", node_name="n1", instance_id="i1")
        self.sleeps: list[float] = []
        self.kubernetes: dict[str, dict[str, str]] = {}  # service -> KubernetesRef fields
        self.engine = PolicyEngine(
            self.store,
            self.events,
            self.policies,
            runner=InlineRunner(self.sleeps.append),  # retries record their backoff, no wait
            report_dir=report_dir,
            external_url=external_url,
        )

    def policy(self, text: str) -> None:
        self.policies.set(textwrap.dedent(text), "test")

    def feed(
        self,
        goroutines: Mapping[str, int],
        *,
        latency: Mapping[str, Mapping[str, list[int]]] | None = None,
        orphans: Mapping[str, int] | None = None,
    ) -> None:
        """One agent batch: a snapshot of each named service's process."""
        self.seq += 1
        b = ing.AgentBatch(agent=self.agent, sequence=self.seq)
        b.heartbeat.interval_seconds = 1.0
        for svc, n in goroutines.items():
            if svc not in self.pids:
                self.pids[svc] = 100 + len(self.pids)
                info = b.processes_appeared.add(
                    pid=self.pids[svc], start_time_unix_nano=self.pids[svc], service=svc
                )
                for k, v in self.kubernetes.get(svc, {}).items():
                    setattr(info.kubernetes, k, v)
            snap = b.snapshots.add(pid=self.pids[svc], goroutines=n)
            site = snap.sites.add(
                function="main.leak", go_statement="/src/main.go:42", creator_function="main.h"
            )
            site.live = n
            g = snap.goroutines_kept.add(
                goid=7, function="main.leak", go_statement="/src/main.go:42", age_seconds=60.0
            )
            g.state, g.wait_reason = t.GOROUTINE_STATE_WAITING, "chan receive"
            g.stack.add(function="runtime.gopark", file="/go/src/runtime/proc.go", line=424)
            g.stack.add(function="main.leak", file="/src/main.go", line=45)
            o = (orphans or {}).get(svc, 0)
            if o:
                site.orphans.count = o
                site.orphans.dominant_wait_reason = "chan receive"
            for fn, values in ((latency or {}).get(svc) or {}).items():
                h = from_values(values, 3)
                lat = snap.latency.add(function=fn)
                lat.histogram.sub_bucket_bits = 3
                lat.histogram.count = h.count
                lat.histogram.sum_seconds = h.sum_seconds
                for idx, c in sorted(h.buckets.items()):
                    lat.histogram.buckets.add(index=idx, count=c)
        self.store.ingest(b, self.now)

    def step(self, goroutines: Mapping[str, int], dt: float = 1.0, **kw: Any) -> list[Any]:
        self.now += dt
        self.feed(goroutines, **kw)
        return self.engine.evaluate(self.now)

    def decisions(self, *, changes_only: bool = True) -> list[dict[str, Any]]:
        evs = self.events.query(EventQuery(kinds=frozenset({t.EVENT_KIND_DECISION})), limit=1000)
        out = [{"service": e.service, "time": e.time, **e.details} for e in evs]
        return [d for d in out if d["decision"] != "hold"] if changes_only else out

    def actions(self) -> list[dict[str, Any]]:
        evs = self.events.query(EventQuery(kinds=frozenset({t.EVENT_KIND_ACTION})), limit=1000)
        return [e.details for e in evs]
