from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrackingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRACKING_MODE_UNSPECIFIED: _ClassVar[TrackingMode]
    TRACKING_MODE_PROBES: _ClassVar[TrackingMode]
    TRACKING_MODE_INVENTORY_ONLY: _ClassVar[TrackingMode]

class GoroutineState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GOROUTINE_STATE_UNSPECIFIED: _ClassVar[GoroutineState]
    GOROUTINE_STATE_IDLE: _ClassVar[GoroutineState]
    GOROUTINE_STATE_RUNNABLE: _ClassVar[GoroutineState]
    GOROUTINE_STATE_RUNNING: _ClassVar[GoroutineState]
    GOROUTINE_STATE_SYSCALL: _ClassVar[GoroutineState]
    GOROUTINE_STATE_WAITING: _ClassVar[GoroutineState]
    GOROUTINE_STATE_DEAD: _ClassVar[GoroutineState]
    GOROUTINE_STATE_COPYSTACK: _ClassVar[GoroutineState]
    GOROUTINE_STATE_PREEMPTED: _ClassVar[GoroutineState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_AGENT_CONNECTED: _ClassVar[EventKind]
    EVENT_KIND_AGENT_DISCONNECTED: _ClassVar[EventKind]
    EVENT_KIND_AGENT_SEQUENCE_GAP: _ClassVar[EventKind]
    EVENT_KIND_PROCESS_APPEARED: _ClassVar[EventKind]
    EVENT_KIND_PROCESS_GONE: _ClassVar[EventKind]
    EVENT_KIND_PROCESS_TRACKING_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_ORPHANS_APPEARED: _ClassVar[EventKind]
    EVENT_KIND_LEAK_SUSPECTED: _ClassVar[EventKind]
    EVENT_KIND_LEAK_CLEARED: _ClassVar[EventKind]
    EVENT_KIND_PANICS: _ClassVar[EventKind]
    EVENT_KIND_POLICY_SET: _ClassVar[EventKind]
    EVENT_KIND_POLICY_REJECTED: _ClassVar[EventKind]
    EVENT_KIND_DECISION: _ClassVar[EventKind]
    EVENT_KIND_ACTION: _ClassVar[EventKind]
    EVENT_KIND_OVERRIDE: _ClassVar[EventKind]
TRACKING_MODE_UNSPECIFIED: TrackingMode
TRACKING_MODE_PROBES: TrackingMode
TRACKING_MODE_INVENTORY_ONLY: TrackingMode
GOROUTINE_STATE_UNSPECIFIED: GoroutineState
GOROUTINE_STATE_IDLE: GoroutineState
GOROUTINE_STATE_RUNNABLE: GoroutineState
GOROUTINE_STATE_RUNNING: GoroutineState
GOROUTINE_STATE_SYSCALL: GoroutineState
GOROUTINE_STATE_WAITING: GoroutineState
GOROUTINE_STATE_DEAD: GoroutineState
GOROUTINE_STATE_COPYSTACK: GoroutineState
GOROUTINE_STATE_PREEMPTED: GoroutineState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_AGENT_CONNECTED: EventKind
EVENT_KIND_AGENT_DISCONNECTED: EventKind
EVENT_KIND_AGENT_SEQUENCE_GAP: EventKind
EVENT_KIND_PROCESS_APPEARED: EventKind
EVENT_KIND_PROCESS_GONE: EventKind
EVENT_KIND_PROCESS_TRACKING_CHANGED: EventKind
EVENT_KIND_ORPHANS_APPEARED: EventKind
EVENT_KIND_LEAK_SUSPECTED: EventKind
EVENT_KIND_LEAK_CLEARED: EventKind
EVENT_KIND_PANICS: EventKind
EVENT_KIND_POLICY_SET: EventKind
EVENT_KIND_POLICY_REJECTED: EventKind
EVENT_KIND_DECISION: EventKind
EVENT_KIND_ACTION: EventKind
EVENT_KIND_OVERRIDE: EventKind

class KubernetesRef(_message.Message):
    __slots__ = ("namespace", "pod", "pod_uid", "container", "workload_kind", "workload_name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    pod_uid: str
    container: str
    workload_kind: str
    workload_name: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ..., pod_uid: _Optional[str] = ..., container: _Optional[str] = ..., workload_kind: _Optional[str] = ..., workload_name: _Optional[str] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "start_time_unix_nano", "exe", "service", "go_version", "tracking_mode", "tracking_reason", "container_id", "kubernetes", "module_path")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    GO_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACKING_MODE_FIELD_NUMBER: _ClassVar[int]
    TRACKING_REASON_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time_unix_nano: int
    exe: str
    service: str
    go_version: str
    tracking_mode: TrackingMode
    tracking_reason: str
    container_id: str
    kubernetes: KubernetesRef
    module_path: str
    def __init__(self, pid: _Optional[int] = ..., start_time_unix_nano: _Optional[int] = ..., exe: _Optional[str] = ..., service: _Optional[str] = ..., go_version: _Optional[str] = ..., tracking_mode: _Optional[_Union[TrackingMode, str]] = ..., tracking_reason: _Optional[str] = ..., container_id: _Optional[str] = ..., kubernetes: _Optional[_Union[KubernetesRef, _Mapping]] = ..., module_path: _Optional[str] = ...) -> None: ...

class StackFrame(_message.Message):
    __slots__ = ("function", "file", "line", "pc")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    PC_FIELD_NUMBER: _ClassVar[int]
    function: str
    file: str
    line: int
    pc: int
    def __init__(self, function: _Optional[str] = ..., file: _Optional[str] = ..., line: _Optional[int] = ..., pc: _Optional[int] = ...) -> None: ...

class AgeQuantiles(_message.Message):
    __slots__ = ("p50_seconds", "p90_seconds", "p99_seconds", "max_seconds", "max_is_lower_bound")
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_IS_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    max_seconds: float
    max_is_lower_bound: bool
    def __init__(self, p50_seconds: _Optional[float] = ..., p90_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ..., max_seconds: _Optional[float] = ..., max_is_lower_bound: _Optional[bool] = ...) -> None: ...

class WaitReasonCount(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    count: int
    def __init__(self, reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class OrphanStats(_message.Message):
    __slots__ = ("count", "oldest_age_seconds", "dominant_wait_reason", "longest_blocked_seconds", "oldest_age_is_lower_bound")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOMINANT_WAIT_REASON_FIELD_NUMBER: _ClassVar[int]
    LONGEST_BLOCKED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_IS_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    count: int
    oldest_age_seconds: float
    dominant_wait_reason: str
    longest_blocked_seconds: float
    oldest_age_is_lower_bound: bool
    def __init__(self, count: _Optional[int] = ..., oldest_age_seconds: _Optional[float] = ..., dominant_wait_reason: _Optional[str] = ..., longest_blocked_seconds: _Optional[float] = ..., oldest_age_is_lower_bound: _Optional[bool] = ...) -> None: ...

class Goroutine(_message.Message):
    __slots__ = ("goid", "parent_goid", "parent_exited", "function", "go_statement", "state", "wait_reason", "age_seconds", "blocked_for_seconds", "stack", "orphan", "created_by", "age_is_lower_bound")
    GOID_FIELD_NUMBER: _ClassVar[int]
    PARENT_GOID_FIELD_NUMBER: _ClassVar[int]
    PARENT_EXITED_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    GO_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WAIT_REASON_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    AGE_IS_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    goid: int
    parent_goid: int
    parent_exited: bool
    function: str
    go_statement: str
    state: GoroutineState
    wait_reason: str
    age_seconds: float
    blocked_for_seconds: float
    stack: _containers.RepeatedCompositeFieldContainer[StackFrame]
    orphan: bool
    created_by: str
    age_is_lower_bound: bool
    def __init__(self, goid: _Optional[int] = ..., parent_goid: _Optional[int] = ..., parent_exited: _Optional[bool] = ..., function: _Optional[str] = ..., go_statement: _Optional[str] = ..., state: _Optional[_Union[GoroutineState, str]] = ..., wait_reason: _Optional[str] = ..., age_seconds: _Optional[float] = ..., blocked_for_seconds: _Optional[float] = ..., stack: _Optional[_Iterable[_Union[StackFrame, _Mapping]]] = ..., orphan: _Optional[bool] = ..., created_by: _Optional[str] = ..., age_is_lower_bound: _Optional[bool] = ...) -> None: ...

class LogLinearHistogram(_message.Message):
    __slots__ = ("sub_bucket_bits", "buckets", "count", "sum_seconds")
    SUB_BUCKET_BITS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sub_bucket_bits: int
    buckets: _containers.RepeatedCompositeFieldContainer[HistogramBucket]
    count: int
    sum_seconds: float
    def __init__(self, sub_bucket_bits: _Optional[int] = ..., buckets: _Optional[_Iterable[_Union[HistogramBucket, _Mapping]]] = ..., count: _Optional[int] = ..., sum_seconds: _Optional[float] = ...) -> None: ...

class HistogramBucket(_message.Message):
    __slots__ = ("index", "count")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "time_unix_nano", "kind", "service", "agent_id", "pid", "message", "details")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    id: int
    time_unix_nano: int
    kind: EventKind
    service: str
    agent_id: str
    pid: int
    message: str
    details: _struct_pb2.Struct
    def __init__(self, id: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., service: _Optional[str] = ..., agent_id: _Optional[str] = ..., pid: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AgentIdentity(_message.Message):
    __slots__ = ("agent_id", "node_name", "instance_id", "version")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    node_name: str
    instance_id: str
    version: str
    def __init__(self, agent_id: _Optional[str] = ..., node_name: _Optional[str] = ..., instance_id: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("interval_seconds", "uptime_seconds", "tracked_processes", "cpu_seconds", "rss_bytes")
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRACKED_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    interval_seconds: float
    uptime_seconds: float
    tracked_processes: int
    cpu_seconds: float
    rss_bytes: int
    def __init__(self, interval_seconds: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., tracked_processes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class DropCount(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    count: int
    def __init__(self, reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...
