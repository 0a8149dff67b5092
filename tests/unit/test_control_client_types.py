"""ControlClient.call has one typed overload per unary GoleashService RPC, so every
call site sees its response type: a new RPC without an overload fails here."""

from __future__ import annotations

import typing

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.control.client import ControlClient


def _overloads() -> dict[str, tuple[type, type]]:
    out = {}
    for fn in typing.get_overloads(ControlClient.call):
        hints = typing.get_type_hints(fn, globalns=vars(q) | {"q": q, "Literal": typing.Literal})
        (name,) = typing.get_args(hints["method"])
        out[name] = (hints["request"], hints["return"])
    return out


def test_every_unary_rpc_has_a_typed_overload() -> None:
    service = q.DESCRIPTOR.services_by_name["GoleashService"]
    unary = {
        m.name: (getattr(q, m.input_type.name), getattr(q, m.output_type.name))
        for m in service.methods
        if not m.server_streaming and not m.client_streaming
    }
    assert _overloads() == unary
