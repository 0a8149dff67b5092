from goleash.api.goleash.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_CONNECTED: _ClassVar[AgentState]
    AGENT_STATE_STALE: _ClassVar[AgentState]
    AGENT_STATE_DISCONNECTED: _ClassVar[AgentState]

class ProcessState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_STATE_UNSPECIFIED: _ClassVar[ProcessState]
    PROCESS_STATE_RUNNING: _ClassVar[ProcessState]
    PROCESS_STATE_STALE: _ClassVar[ProcessState]
    PROCESS_STATE_GONE: _ClassVar[ProcessState]

class ProcessOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_ORDER_UNSPECIFIED: _ClassVar[ProcessOrder]
    PROCESS_ORDER_GOROUTINES: _ClassVar[ProcessOrder]
    PROCESS_ORDER_ORPHANS: _ClassVar[ProcessOrder]

class PolicyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_MODE_UNSPECIFIED: _ClassVar[PolicyMode]
    POLICY_MODE_ENFORCE: _ClassVar[PolicyMode]
    POLICY_MODE_MONITOR: _ClassVar[PolicyMode]
    POLICY_MODE_OFF: _ClassVar[PolicyMode]

class OverrideAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OVERRIDE_ACTION_UNSPECIFIED: _ClassVar[OverrideAction]
    OVERRIDE_ACTION_PAUSE_RULE: _ClassVar[OverrideAction]
    OVERRIDE_ACTION_FORCE_DEGRADE: _ClassVar[OverrideAction]
    OVERRIDE_ACTION_FORCE_RECOVER: _ClassVar[OverrideAction]
    OVERRIDE_ACTION_CLEAR: _ClassVar[OverrideAction]
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_CONNECTED: AgentState
AGENT_STATE_STALE: AgentState
AGENT_STATE_DISCONNECTED: AgentState
PROCESS_STATE_UNSPECIFIED: ProcessState
PROCESS_STATE_RUNNING: ProcessState
PROCESS_STATE_STALE: ProcessState
PROCESS_STATE_GONE: ProcessState
PROCESS_ORDER_UNSPECIFIED: ProcessOrder
PROCESS_ORDER_GOROUTINES: ProcessOrder
PROCESS_ORDER_ORPHANS: ProcessOrder
POLICY_MODE_UNSPECIFIED: PolicyMode
POLICY_MODE_ENFORCE: PolicyMode
POLICY_MODE_MONITOR: PolicyMode
POLICY_MODE_OFF: PolicyMode
OVERRIDE_ACTION_UNSPECIFIED: OverrideAction
OVERRIDE_ACTION_PAUSE_RULE: OverrideAction
OVERRIDE_ACTION_FORCE_DEGRADE: OverrideAction
OVERRIDE_ACTION_FORCE_RECOVER: OverrideAction
OVERRIDE_ACTION_CLEAR: OverrideAction

class ProcessSelector(_message.Message):
    __slots__ = ("service", "agent_id", "pid")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    service: str
    agent_id: str
    pid: int
    def __init__(self, service: _Optional[str] = ..., agent_id: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("identity", "state", "first_seen_unix_nano", "last_seen_unix_nano", "last_sequence", "batches", "duplicates", "gaps", "processes", "heartbeat", "drops")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    identity: _types_pb2.AgentIdentity
    state: AgentState
    first_seen_unix_nano: int
    last_seen_unix_nano: int
    last_sequence: int
    batches: int
    duplicates: int
    gaps: int
    processes: int
    heartbeat: _types_pb2.Heartbeat
    drops: _containers.RepeatedCompositeFieldContainer[_types_pb2.DropCount]
    def __init__(self, identity: _Optional[_Union[_types_pb2.AgentIdentity, _Mapping]] = ..., state: _Optional[_Union[AgentState, str]] = ..., first_seen_unix_nano: _Optional[int] = ..., last_seen_unix_nano: _Optional[int] = ..., last_sequence: _Optional[int] = ..., batches: _Optional[int] = ..., duplicates: _Optional[int] = ..., gaps: _Optional[int] = ..., processes: _Optional[int] = ..., heartbeat: _Optional[_Union[_types_pb2.Heartbeat, _Mapping]] = ..., drops: _Optional[_Iterable[_Union[_types_pb2.DropCount, _Mapping]]] = ...) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ("selector", "window_seconds", "include_gone", "order_by", "limit")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GONE_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    selector: ProcessSelector
    window_seconds: float
    include_gone: bool
    order_by: ProcessOrder
    limit: int
    def __init__(self, selector: _Optional[_Union[ProcessSelector, _Mapping]] = ..., window_seconds: _Optional[float] = ..., include_gone: _Optional[bool] = ..., order_by: _Optional[_Union[ProcessOrder, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes", "window_seconds", "total_size")
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessStatus]
    window_seconds: float
    total_size: int
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessStatus, _Mapping]]] = ..., window_seconds: _Optional[float] = ..., total_size: _Optional[int] = ...) -> None: ...

class ProcessStatus(_message.Message):
    __slots__ = ("info", "agent_id", "node_name", "state", "first_seen_unix_nano", "last_seen_unix_nano", "goroutines", "created", "exited", "orphans", "panics", "drops", "gone_reason")
    INFO_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    GOROUTINES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    PANICS_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    GONE_REASON_FIELD_NUMBER: _ClassVar[int]
    info: _types_pb2.ProcessInfo
    agent_id: str
    node_name: str
    state: ProcessState
    first_seen_unix_nano: int
    last_seen_unix_nano: int
    goroutines: int
    created: int
    exited: int
    orphans: int
    panics: int
    drops: _containers.RepeatedCompositeFieldContainer[_types_pb2.DropCount]
    gone_reason: str
    def __init__(self, info: _Optional[_Union[_types_pb2.ProcessInfo, _Mapping]] = ..., agent_id: _Optional[str] = ..., node_name: _Optional[str] = ..., state: _Optional[_Union[ProcessState, str]] = ..., first_seen_unix_nano: _Optional[int] = ..., last_seen_unix_nano: _Optional[int] = ..., goroutines: _Optional[int] = ..., created: _Optional[int] = ..., exited: _Optional[int] = ..., orphans: _Optional[int] = ..., panics: _Optional[int] = ..., drops: _Optional[_Iterable[_Union[_types_pb2.DropCount, _Mapping]]] = ..., gone_reason: _Optional[str] = ...) -> None: ...

class GetGoroutineSummaryRequest(_message.Message):
    __slots__ = ("selector", "window_seconds", "limit")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    selector: ProcessSelector
    window_seconds: float
    limit: int
    def __init__(self, selector: _Optional[_Union[ProcessSelector, _Mapping]] = ..., window_seconds: _Optional[float] = ..., limit: _Optional[int] = ...) -> None: ...

class GetGoroutineSummaryResponse(_message.Message):
    __slots__ = ("window_seconds", "processes", "goroutines", "created", "exited", "orphans", "sites")
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    GOROUTINES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    window_seconds: float
    processes: int
    goroutines: int
    created: int
    exited: int
    orphans: int
    sites: _containers.RepeatedCompositeFieldContainer[SiteStats]
    def __init__(self, window_seconds: _Optional[float] = ..., processes: _Optional[int] = ..., goroutines: _Optional[int] = ..., created: _Optional[int] = ..., exited: _Optional[int] = ..., orphans: _Optional[int] = ..., sites: _Optional[_Iterable[_Union[SiteStats, _Mapping]]] = ...) -> None: ...

class SiteStats(_message.Message):
    __slots__ = ("service", "function", "go_statement", "creator_function", "live", "created", "exited", "growth_per_minute", "age", "wait_reasons", "orphans", "processes")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    GO_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    GROWTH_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_REASONS_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    service: str
    function: str
    go_statement: str
    creator_function: str
    live: int
    created: int
    exited: int
    growth_per_minute: float
    age: _types_pb2.AgeQuantiles
    wait_reasons: _containers.RepeatedCompositeFieldContainer[_types_pb2.WaitReasonCount]
    orphans: int
    processes: int
    def __init__(self, service: _Optional[str] = ..., function: _Optional[str] = ..., go_statement: _Optional[str] = ..., creator_function: _Optional[str] = ..., live: _Optional[int] = ..., created: _Optional[int] = ..., exited: _Optional[int] = ..., growth_per_minute: _Optional[float] = ..., age: _Optional[_Union[_types_pb2.AgeQuantiles, _Mapping]] = ..., wait_reasons: _Optional[_Iterable[_Union[_types_pb2.WaitReasonCount, _Mapping]]] = ..., orphans: _Optional[int] = ..., processes: _Optional[int] = ...) -> None: ...

class ListGoroutinesRequest(_message.Message):
    __slots__ = ("selector", "site", "state", "min_age_seconds", "min_blocked_for_seconds", "orphans_only", "page_size", "page_token")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MIN_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_BLOCKED_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    selector: ProcessSelector
    site: str
    state: _types_pb2.GoroutineState
    min_age_seconds: float
    min_blocked_for_seconds: float
    orphans_only: bool
    page_size: int
    page_token: str
    def __init__(self, selector: _Optional[_Union[ProcessSelector, _Mapping]] = ..., site: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.GoroutineState, str]] = ..., min_age_seconds: _Optional[float] = ..., min_blocked_for_seconds: _Optional[float] = ..., orphans_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListGoroutinesResponse(_message.Message):
    __slots__ = ("goroutines", "next_page_token", "total_size")
    GOROUTINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    goroutines: _containers.RepeatedCompositeFieldContainer[GoroutineRecord]
    next_page_token: str
    total_size: int
    def __init__(self, goroutines: _Optional[_Iterable[_Union[GoroutineRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class GoroutineRecord(_message.Message):
    __slots__ = ("service", "agent_id", "pid", "goroutine", "observed_unix_nano")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GOROUTINE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    service: str
    agent_id: str
    pid: int
    goroutine: _types_pb2.Goroutine
    observed_unix_nano: int
    def __init__(self, service: _Optional[str] = ..., agent_id: _Optional[str] = ..., pid: _Optional[int] = ..., goroutine: _Optional[_Union[_types_pb2.Goroutine, _Mapping]] = ..., observed_unix_nano: _Optional[int] = ...) -> None: ...

class ListOrphansRequest(_message.Message):
    __slots__ = ("selector", "min_age_seconds")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    selector: ProcessSelector
    min_age_seconds: float
    def __init__(self, selector: _Optional[_Union[ProcessSelector, _Mapping]] = ..., min_age_seconds: _Optional[float] = ...) -> None: ...

class ListOrphansResponse(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[OrphanGroup]
    def __init__(self, groups: _Optional[_Iterable[_Union[OrphanGroup, _Mapping]]] = ...) -> None: ...

class OrphanGroup(_message.Message):
    __slots__ = ("service", "function", "go_statement", "creator_function", "count", "oldest_age_seconds", "reason", "longest_blocked_seconds", "processes", "example", "oldest_age_is_lower_bound")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    GO_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LONGEST_BLOCKED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_IS_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    service: str
    function: str
    go_statement: str
    creator_function: str
    count: int
    oldest_age_seconds: float
    reason: str
    longest_blocked_seconds: float
    processes: int
    example: GoroutineRecord
    oldest_age_is_lower_bound: bool
    def __init__(self, service: _Optional[str] = ..., function: _Optional[str] = ..., go_statement: _Optional[str] = ..., creator_function: _Optional[str] = ..., count: _Optional[int] = ..., oldest_age_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., longest_blocked_seconds: _Optional[float] = ..., processes: _Optional[int] = ..., example: _Optional[_Union[GoroutineRecord, _Mapping]] = ..., oldest_age_is_lower_bound: _Optional[bool] = ...) -> None: ...

class ListLeakSuspectsRequest(_message.Message):
    __slots__ = ("selector", "window_seconds")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    selector: ProcessSelector
    window_seconds: float
    def __init__(self, selector: _Optional[_Union[ProcessSelector, _Mapping]] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class ListLeakSuspectsResponse(_message.Message):
    __slots__ = ("suspects", "window_seconds")
    SUSPECTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    suspects: _containers.RepeatedCompositeFieldContainer[LeakSuspect]
    window_seconds: float
    def __init__(self, suspects: _Optional[_Iterable[_Union[LeakSuspect, _Mapping]]] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class LeakSuspect(_message.Message):
    __slots__ = ("service", "function", "go_statement", "creator_function", "live", "live_at_start", "growth_per_minute", "steady_fraction", "oldest_age_start_seconds", "oldest_age_seconds", "age", "wait_reasons", "processes", "example")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    GO_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    LIVE_AT_START_FIELD_NUMBER: _ClassVar[int]
    GROWTH_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    STEADY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_REASONS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    service: str
    function: str
    go_statement: str
    creator_function: str
    live: int
    live_at_start: int
    growth_per_minute: float
    steady_fraction: float
    oldest_age_start_seconds: float
    oldest_age_seconds: float
    age: _types_pb2.AgeQuantiles
    wait_reasons: _containers.RepeatedCompositeFieldContainer[_types_pb2.WaitReasonCount]
    processes: int
    example: GoroutineRecord
    def __init__(self, service: _Optional[str] = ..., function: _Optional[str] = ..., go_statement: _Optional[str] = ..., creator_function: _Optional[str] = ..., live: _Optional[int] = ..., live_at_start: _Optional[int] = ..., growth_per_minute: _Optional[float] = ..., steady_fraction: _Optional[float] = ..., oldest_age_start_seconds: _Optional[float] = ..., oldest_age_seconds: _Optional[float] = ..., age: _Optional[_Union[_types_pb2.AgeQuantiles, _Mapping]] = ..., wait_reasons: _Optional[_Iterable[_Union[_types_pb2.WaitReasonCount, _Mapping]]] = ..., processes: _Optional[int] = ..., example: _Optional[_Union[GoroutineRecord, _Mapping]] = ...) -> None: ...

class GetFunctionLatencyRequest(_message.Message):
    __slots__ = ("function", "selector", "window_seconds", "quantiles")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    function: str
    selector: ProcessSelector
    window_seconds: float
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, function: _Optional[str] = ..., selector: _Optional[_Union[ProcessSelector, _Mapping]] = ..., window_seconds: _Optional[float] = ..., quantiles: _Optional[_Iterable[float]] = ...) -> None: ...

class GetFunctionLatencyResponse(_message.Message):
    __slots__ = ("function", "window_seconds", "count", "mean_seconds", "quantiles", "histogram", "processes", "calls", "calls_error")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CALLS_ERROR_FIELD_NUMBER: _ClassVar[int]
    function: str
    window_seconds: float
    count: int
    mean_seconds: float
    quantiles: _containers.RepeatedCompositeFieldContainer[QuantileValue]
    histogram: _types_pb2.LogLinearHistogram
    processes: int
    calls: int
    calls_error: float
    def __init__(self, function: _Optional[str] = ..., window_seconds: _Optional[float] = ..., count: _Optional[int] = ..., mean_seconds: _Optional[float] = ..., quantiles: _Optional[_Iterable[_Union[QuantileValue, _Mapping]]] = ..., histogram: _Optional[_Union[_types_pb2.LogLinearHistogram, _Mapping]] = ..., processes: _Optional[int] = ..., calls: _Optional[int] = ..., calls_error: _Optional[float] = ...) -> None: ...

class QuantileValue(_message.Message):
    __slots__ = ("quantile", "value_seconds")
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    VALUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    quantile: float
    value_seconds: float
    def __init__(self, quantile: _Optional[float] = ..., value_seconds: _Optional[float] = ...) -> None: ...

class EventFilter(_message.Message):
    __slots__ = ("kinds", "service", "agent_id", "pid")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[_types_pb2.EventKind]
    service: str
    agent_id: str
    pid: int
    def __init__(self, kinds: _Optional[_Iterable[_Union[_types_pb2.EventKind, str]]] = ..., service: _Optional[str] = ..., agent_id: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("filter", "after_id", "newest_first", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: EventFilter
    after_id: int
    newest_first: bool
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[EventFilter, _Mapping]] = ..., after_id: _Optional[int] = ..., newest_first: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("filter", "after_id", "from_start")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_START_FIELD_NUMBER: _ClassVar[int]
    filter: EventFilter
    after_id: int
    from_start: bool
    def __init__(self, filter: _Optional[_Union[EventFilter, _Mapping]] = ..., after_id: _Optional[int] = ..., from_start: _Optional[bool] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _types_pb2.Event
    def __init__(self, event: _Optional[_Union[_types_pb2.Event, _Mapping]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy_yaml", "version", "set_unix_nano", "source", "mode", "overrides")
    POLICY_YAML_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SET_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    policy_yaml: str
    version: int
    set_unix_nano: int
    source: str
    mode: PolicyMode
    overrides: _containers.RepeatedCompositeFieldContainer[Override]
    def __init__(self, policy_yaml: _Optional[str] = ..., version: _Optional[int] = ..., set_unix_nano: _Optional[int] = ..., source: _Optional[str] = ..., mode: _Optional[_Union[PolicyMode, str]] = ..., overrides: _Optional[_Iterable[_Union[Override, _Mapping]]] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy_yaml", "validate_only")
    POLICY_YAML_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    policy_yaml: str
    validate_only: bool
    def __init__(self, policy_yaml: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("version", "mode", "rules")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    version: int
    mode: PolicyMode
    rules: int
    def __init__(self, version: _Optional[int] = ..., mode: _Optional[_Union[PolicyMode, str]] = ..., rules: _Optional[int] = ...) -> None: ...

class ListDecisionsRequest(_message.Message):
    __slots__ = ("service", "page_size", "page_token")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    service: str
    page_size: int
    page_token: str
    def __init__(self, service: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDecisionsResponse(_message.Message):
    __slots__ = ("decisions", "next_page_token")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    next_page_token: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class OverrideServiceRequest(_message.Message):
    __slots__ = ("service", "action", "rule", "level", "duration_seconds", "reason")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    service: str
    action: OverrideAction
    rule: str
    level: str
    duration_seconds: float
    reason: str
    def __init__(self, service: _Optional[str] = ..., action: _Optional[_Union[OverrideAction, str]] = ..., rule: _Optional[str] = ..., level: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class OverrideServiceResponse(_message.Message):
    __slots__ = ("override", "cleared")
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    override: Override
    cleared: int
    def __init__(self, override: _Optional[_Union[Override, _Mapping]] = ..., cleared: _Optional[int] = ...) -> None: ...

class Override(_message.Message):
    __slots__ = ("id", "service", "action", "rule", "level", "reason", "created_unix_nano", "expires_unix_nano")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    id: int
    service: str
    action: OverrideAction
    rule: str
    level: str
    reason: str
    created_unix_nano: int
    expires_unix_nano: int
    def __init__(self, id: _Optional[int] = ..., service: _Optional[str] = ..., action: _Optional[_Union[OverrideAction, str]] = ..., rule: _Optional[str] = ..., level: _Optional[str] = ..., reason: _Optional[str] = ..., created_unix_nano: _Optional[int] = ..., expires_unix_nano: _Optional[int] = ...) -> None: ...
