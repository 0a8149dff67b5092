# PYTHON_ARGCOMPLETE_OK
"""The one `goleash` command.

Each subcommand is a small function taking parsed args and returning an exit code;
the work itself lives in the packages (gobin, probes, node, control). Exit codes:
0 success, 1 the check a command makes failed (e.g. leaks found where asked to
fail on them), 2 bad input or an environment goleash cannot work in (message on
stderr, never a traceback), 130 interrupted.

Options go anywhere in the line, as in kubectl: the global ones (logging, the
control plane connection) before or after the subcommand, a subcommand's options
before or after its positional arguments (`policy set --dry-run pol.yaml`). A bad
option prints that subcommand's usage.
"""

# The command is split into one module per command group (binary, local, queries,
# daemons, policy, check, record), the shared option helpers (options) and the parser
# with main (parser). Every name the single module had stays importable from here.

from __future__ import annotations

from goleash.cli.binary import (
    cmd_inspect,
    cmd_symbolize,
)
from goleash.cli.check import (
    cmd_check,
)
from goleash.cli.daemons import (
    _agent_args,
    _agent_config,
    _otlp_env,
    cmd_agent,
    cmd_control_plane,
    cmd_run,
)
from goleash.cli.local import (
    DUMP_FORMATS,
    _dump_format,
    _dump_from_server,
    _latency_from_server,
    _remote,
    _write_profile,
    cmd_dump,
    cmd_latency,
    cmd_panics,
    cmd_trace,
)
from goleash.cli.options import (
    BUDGET_HELP,
    LOG_LEVELS,
    MAX_PID,
    MAX_SECONDS,
    Handler,
    OneLineParser,
    _access_args,
    _auth_config,
    _client,
    _global_args,
    _log_args,
    _number,
    _server_args,
    _target_args,
    _token_args,
    arg_address,
    arg_pid,
    arg_seconds,
    arg_seconds_or_zero,
    budget_arg,
    print_json,
)
from goleash.cli.parser import (
    _ONE_TARGET_COMMANDS,
    DAEMONS,
    JsonLogFormatter,
    TextLogFormatter,
    _autocomplete,
    _globals_parser,
    _printable,
    _rfc3339,
    build_parser,
    main,
    parse_args,
    setup_logging,
)
from goleash.cli.policy import (
    _read_policy,
    cmd_decisions,
    cmd_override,
    cmd_policy,
)
from goleash.cli.queries import (
    cmd_agents,
    cmd_events,
    cmd_orphans,
    cmd_ps,
    cmd_top,
)
from goleash.cli.record import (
    _load_record,
    _service_record,
    cmd_diff,
    cmd_record,
)

__all__ = [
    "BUDGET_HELP",
    "DAEMONS",
    "DUMP_FORMATS",
    "Handler",
    "JsonLogFormatter",
    "LOG_LEVELS",
    "MAX_PID",
    "MAX_SECONDS",
    "OneLineParser",
    "TextLogFormatter",
    "_ONE_TARGET_COMMANDS",
    "_access_args",
    "_agent_args",
    "_agent_config",
    "_auth_config",
    "_autocomplete",
    "_client",
    "_dump_format",
    "_dump_from_server",
    "_global_args",
    "_globals_parser",
    "_latency_from_server",
    "_load_record",
    "_log_args",
    "_number",
    "_otlp_env",
    "_printable",
    "_read_policy",
    "_remote",
    "_rfc3339",
    "_server_args",
    "_service_record",
    "_target_args",
    "_token_args",
    "_write_profile",
    "arg_address",
    "arg_pid",
    "arg_seconds",
    "arg_seconds_or_zero",
    "budget_arg",
    "build_parser",
    "cmd_agent",
    "cmd_agents",
    "cmd_check",
    "cmd_control_plane",
    "cmd_decisions",
    "cmd_diff",
    "cmd_dump",
    "cmd_events",
    "cmd_inspect",
    "cmd_latency",
    "cmd_orphans",
    "cmd_override",
    "cmd_panics",
    "cmd_policy",
    "cmd_ps",
    "cmd_record",
    "cmd_run",
    "cmd_symbolize",
    "cmd_top",
    "cmd_trace",
    "main",
    "parse_args",
    "print_json",
    "setup_logging",
]
