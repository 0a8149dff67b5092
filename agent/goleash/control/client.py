"""Talking to a control plane from the CLI (or any Python tool): a channel with the
right credentials, and gRPC failures turned into messages a person can act on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import grpc
from google.protobuf.message import Message

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import goleash_service_pb2_grpc as q_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import DEFAULT_SERVER
from goleash.control.auth import client_token
from goleash.errors import GoleashError


class ControlPlaneError(GoleashError):
    """The control plane could not be reached or refused the request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClientOptions:
    """Where the control plane is and how to authenticate to it."""

    server: str = DEFAULT_SERVER
    token: str | None = None
    tls_ca: str | None = None  # set: TLS, verifying the server against this CA
    tls_cert: str | None = None  # with tls_key: client certificate for mTLS
    tls_key: str | None = None
    timeout: float = 10.0

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientOptions:
        """Defaults from GOLEASH_SERVER / GOLEASH_TOKEN, then explicit overrides. A set
        but empty GOLEASH_TOKEN is an error (AuthSetupError), not "no token"."""
        base: dict[str, Any] = {"server": os.environ.get("GOLEASH_SERVER", DEFAULT_SERVER)}
        if overrides.get("token") is None:
            base["token"] = client_token()
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ControlPlaneError(f"cannot read {path}: {exc.strerror}") from exc


class ControlClient:
    """A GoleashService client whose errors are ControlPlaneError."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        if opts.tls_ca or opts.tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(opts.tls_ca) if opts.tls_ca else None,
                private_key=_read(opts.tls_key) if opts.tls_key else None,
                certificate_chain=_read(opts.tls_cert) if opts.tls_cert else None,
            )
            self._channel = grpc.secure_channel(opts.server, creds)
        else:
            self._channel = grpc.insecure_channel(opts.server)
        self.stub = q_grpc.GoleashServiceStub(self._channel)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.opts.token}"),) if self.opts.token else ()

    def _explain(self, exc: grpc.RpcError) -> ControlPlaneError:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details()  # type: ignore[attr-defined]
        server = self.opts.server
        if code == grpc.StatusCode.UNAVAILABLE:
            msg = (
                f"cannot reach the control plane at {server} ({details}); start one with "
                "`goleash control-plane` or `goleash run`, or point --server at it"
            )
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            msg = (
                f"the control plane at {server} did not accept these credentials ({details}); "
                "give a token with --token-file or $GOLEASH_TOKEN (or a client certificate)"
            )
        elif code == grpc.StatusCode.PERMISSION_DENIED:
            msg = f"permission denied: {details}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            msg = f"the control plane at {server} did not answer within {self.opts.timeout:g}s"
        else:
            msg = f"{code.name.lower().replace('_', ' ')}: {details}"
        return ControlPlaneError(msg, code)

    # One overload per unary RPC: every call site sees its response type, and a name
    # that is no RPC of the service does not type-check (tests/unit check the list
    # against the service's descriptor).
    @overload
    def call(
        self, method: Literal["ListAgents"], request: q.ListAgentsRequest
    ) -> q.ListAgentsResponse: ...
    @overload
    def call(
        self, method: Literal["ListProcesses"], request: q.ListProcessesRequest
    ) -> q.ListProcessesResponse: ...
    @overload
    def call(
        self, method: Literal["GetGoroutineSummary"], request: q.GetGoroutineSummaryRequest
    ) -> q.GetGoroutineSummaryResponse: ...
    @overload
    def call(
        self, method: Literal["ListGoroutines"], request: q.ListGoroutinesRequest
    ) -> q.ListGoroutinesResponse: ...
    @overload
    def call(
        self, method: Literal["ListOrphans"], request: q.ListOrphansRequest
    ) -> q.ListOrphansResponse: ...
    @overload
    def call(
        self, method: Literal["ListLeakSuspects"], request: q.ListLeakSuspectsRequest
    ) -> q.ListLeakSuspectsResponse: ...
    @overload
    def call(
        self, method: Literal["GetFunctionLatency"], request: q.GetFunctionLatencyRequest
    ) -> q.GetFunctionLatencyResponse: ...
    @overload
    def call(
        self, method: Literal["ListEvents"], request: q.ListEventsRequest
    ) -> q.ListEventsResponse: ...
    @overload
    def call(
        self, method: Literal["GetPolicy"], request: q.GetPolicyRequest
    ) -> q.GetPolicyResponse: ...
    @overload
    def call(
        self, method: Literal["SetPolicy"], request: q.SetPolicyRequest
    ) -> q.SetPolicyResponse: ...
    @overload
    def call(
        self, method: Literal["ListDecisions"], request: q.ListDecisionsRequest
    ) -> q.ListDecisionsResponse: ...
    @overload
    def call(
        self, method: Literal["OverrideService"], request: q.OverrideServiceRequest
    ) -> q.OverrideServiceResponse: ...
    def call(self, method: str, request: Message) -> Message:
        """Call a unary GoleashService method by name, e.g. call("ListOrphans", req)."""
        try:
            response: Message = getattr(self.stub, method)(
                request, timeout=self.opts.timeout, metadata=self._metadata()
            )
        except grpc.RpcError as exc:
            raise self._explain(exc) from exc
        return response

    def watch_events(self, request: q.WatchEventsRequest) -> Iterator[t.Event]:
        """Events as they come, until the server ends the stream or the caller stops."""
        stream = self.stub.WatchEvents(request, metadata=self._metadata())
        try:
            for resp in stream:
                yield resp.event
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                return
            raise self._explain(exc) from exc
        finally:
            stream.cancel()
