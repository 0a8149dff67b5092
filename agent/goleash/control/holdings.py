"""What an agent would make the Store hold after a batch, checked against the caps.

Agents, processes, sites and traced functions are counted before anything changes,
so a refused batch changes nothing."""

from __future__ import annotations

from typing import Protocol

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.control import limits as caps
from goleash.control.limits import InvalidArgument, Limits, ResourceExhausted
from goleash.control.records import AgentState, ProcKey, ProcState


class Store(Protocol):
    """What the caps are checked against: the part of state.Store read here."""

    limits: Limits
    agents: dict[str, AgentState]
    procs: dict[ProcKey, ProcState]
    sites_held: int


def check_holdings(store: Store, b: ing.AgentBatch) -> int:
    """Raise (ControlError) when the batch would take its agent or the control plane
    over a cap, or skips too many sequence numbers; else the sites the agent would
    hold."""
    lim = store.limits
    agent_id = b.agent.agent_id
    a = store.agents.get(agent_id)
    if a is None:
        if len(store.agents) >= lim.agents:
            raise ResourceExhausted(
                f"this control plane follows {len(store.agents)} agents, its cap; "
                f"disconnected agents are forgotten after {lim.agent_ttl_seconds:g}s"
            )
        last, procs, held_before = 0, set(), 0
    else:
        same = b.agent.instance_id == a.instance_id
        last, procs = (a.last_sequence if same else 0), a.procs
        held_before = a.sites
    if last and b.sequence > last + lim.sequence_jump:
        raise InvalidArgument(
            f"batch.sequence {b.sequence} jumps {b.sequence - last} past the last one "
            f"({last}); at most {lim.sequence_jump} batches can go missing"
        )
    new = {(agent_id, i.pid) for i in b.processes_appeared} - procs
    caps._count(f"agent {agent_id[:80]}: processes", len(procs) + len(new), lim.processes_per_agent)
    caps._count("processes of all agents", len(store.procs) + len(new), lim.processes_total)
    sites, fns = _sites_and_functions(store, b, procs, new)
    caps._count(f"agent {agent_id[:80]}: sites", sites, lim.sites_per_agent)
    caps._count("sites of all agents", store.sites_held - held_before + sites, lim.sites_total)
    caps._count(f"agent {agent_id[:80]}: traced functions", fns, lim.functions_per_agent)
    for key, s in _snapshots(b).items():
        p = store.procs.get(key)
        if p is not None and p.gone_at is None:
            n = len(p.latency.keys() | {lat.function for lat in s.latency})
            caps._count(f"pid {s.pid}: traced functions", n, lim.functions_per_process)
    return sites


def _snapshots(b: ing.AgentBatch) -> dict[ProcKey, ing.ProcessSnapshot]:
    return {(b.agent.agent_id, s.pid): s for s in b.snapshots}


def _sites_and_functions(
    store: Store, b: ing.AgentBatch, procs: set[ProcKey], new: set[ProcKey]
) -> tuple[int, int]:
    """Sites and traced functions the agent would hold after this batch."""
    snap = _snapshots(b)
    sites = fns = 0
    for key in procs:
        p = store.procs.get(key)
        s = snap.get(key)
        if p is None:
            continue
        if s is None:
            sites += len(p.sites)
            fns += len(p.latency)
        else:  # sites it had stay until idle for the retention
            held = p.sites
            sites += len(held) + sum(
                1 for ss in s.sites if (ss.function, ss.go_statement) not in held
            )
            fns += len(p.latency.keys() | {lat.function for lat in s.latency})
    for key in new:
        s = snap.get(key)
        if s is not None:
            sites += len(s.sites)
            fns += len({lat.function for lat in s.latency})
    return sites, fns
