from goleash.api.goleash.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamBatchesRequest(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: AgentBatch
    def __init__(self, batch: _Optional[_Union[AgentBatch, _Mapping]] = ...) -> None: ...

class StreamBatchesResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "gaps", "last_sequence")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    gaps: int
    last_sequence: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., gaps: _Optional[int] = ..., last_sequence: _Optional[int] = ...) -> None: ...

class AgentBatch(_message.Message):
    __slots__ = ("agent", "sequence", "time_unix_nano", "heartbeat", "processes_appeared", "processes_gone", "snapshots", "drops")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_APPEARED_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_GONE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    agent: _types_pb2.AgentIdentity
    sequence: int
    time_unix_nano: int
    heartbeat: _types_pb2.Heartbeat
    processes_appeared: _containers.RepeatedCompositeFieldContainer[_types_pb2.ProcessInfo]
    processes_gone: _containers.RepeatedCompositeFieldContainer[ProcessGone]
    snapshots: _containers.RepeatedCompositeFieldContainer[ProcessSnapshot]
    drops: _containers.RepeatedCompositeFieldContainer[_types_pb2.DropCount]
    def __init__(self, agent: _Optional[_Union[_types_pb2.AgentIdentity, _Mapping]] = ..., sequence: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., heartbeat: _Optional[_Union[_types_pb2.Heartbeat, _Mapping]] = ..., processes_appeared: _Optional[_Iterable[_Union[_types_pb2.ProcessInfo, _Mapping]]] = ..., processes_gone: _Optional[_Iterable[_Union[ProcessGone, _Mapping]]] = ..., snapshots: _Optional[_Iterable[_Union[ProcessSnapshot, _Mapping]]] = ..., drops: _Optional[_Iterable[_Union[_types_pb2.DropCount, _Mapping]]] = ...) -> None: ...

class ProcessGone(_message.Message):
    __slots__ = ("pid", "start_time_unix_nano", "reason")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time_unix_nano: int
    reason: str
    def __init__(self, pid: _Optional[int] = ..., start_time_unix_nano: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ProcessSnapshot(_message.Message):
    __slots__ = ("pid", "time_unix_nano", "goroutines", "sites", "goroutines_kept", "latency", "panics", "drops")
    PID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    GOROUTINES_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    GOROUTINES_KEPT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    PANICS_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    time_unix_nano: int
    goroutines: int
    sites: _containers.RepeatedCompositeFieldContainer[SiteSummary]
    goroutines_kept: _containers.RepeatedCompositeFieldContainer[_types_pb2.Goroutine]
    latency: _containers.RepeatedCompositeFieldContainer[LatencyHistogramDelta]
    panics: _containers.RepeatedCompositeFieldContainer[PanicCount]
    drops: _containers.RepeatedCompositeFieldContainer[_types_pb2.DropCount]
    def __init__(self, pid: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., goroutines: _Optional[int] = ..., sites: _Optional[_Iterable[_Union[SiteSummary, _Mapping]]] = ..., goroutines_kept: _Optional[_Iterable[_Union[_types_pb2.Goroutine, _Mapping]]] = ..., latency: _Optional[_Iterable[_Union[LatencyHistogramDelta, _Mapping]]] = ..., panics: _Optional[_Iterable[_Union[PanicCount, _Mapping]]] = ..., drops: _Optional[_Iterable[_Union[_types_pb2.DropCount, _Mapping]]] = ...) -> None: ...

class SiteSummary(_message.Message):
    __slots__ = ("function", "go_statement", "creator_function", "live", "created", "exited", "age", "wait_reasons", "orphans")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    GO_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_REASONS_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    function: str
    go_statement: str
    creator_function: str
    live: int
    created: int
    exited: int
    age: _types_pb2.AgeQuantiles
    wait_reasons: _containers.RepeatedCompositeFieldContainer[_types_pb2.WaitReasonCount]
    orphans: _types_pb2.OrphanStats
    def __init__(self, function: _Optional[str] = ..., go_statement: _Optional[str] = ..., creator_function: _Optional[str] = ..., live: _Optional[int] = ..., created: _Optional[int] = ..., exited: _Optional[int] = ..., age: _Optional[_Union[_types_pb2.AgeQuantiles, _Mapping]] = ..., wait_reasons: _Optional[_Iterable[_Union[_types_pb2.WaitReasonCount, _Mapping]]] = ..., orphans: _Optional[_Union[_types_pb2.OrphanStats, _Mapping]] = ...) -> None: ...

class LatencyHistogramDelta(_message.Message):
    __slots__ = ("function", "histogram", "calls", "calls_error")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CALLS_ERROR_FIELD_NUMBER: _ClassVar[int]
    function: str
    histogram: _types_pb2.LogLinearHistogram
    calls: int
    calls_error: float
    def __init__(self, function: _Optional[str] = ..., histogram: _Optional[_Union[_types_pb2.LogLinearHistogram, _Mapping]] = ..., calls: _Optional[int] = ..., calls_error: _Optional[float] = ...) -> None: ...

class PanicCount(_message.Message):
    __slots__ = ("function", "count")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    function: str
    count: int
    def __init__(self, function: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...
