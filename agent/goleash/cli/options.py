"""What every subcommand shares: argument types that refuse nonsense while the line is
parsed, the option groups (control plane connection, authentication, logging), and
the client those options describe."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

Handler = Callable[[argparse.Namespace], int]


# --- argument types ------------------------------------------------------------
# Every subcommand shares these: nonsense is refused while the command line is parsed
# (one line, exit 2), before any work. float("nan"), float("inf") and "1e400" all
# parse as floats; a duration, interval or budget that is not a finite positive number
# would only fail later, and less clearly (a loop that never sleeps, a wait that never
# ends).

MAX_SECONDS = 366 * 24 * 3600.0  # a year: longer is a typo, and overflows some waits


MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def arg_seconds(text: str) -> float:
    """A duration or interval: a finite number of seconds, more than zero."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: more than a year of seconds")
    return value


def arg_seconds_or_zero(text: str) -> float:
    """Seconds where 0 has a meaning of its own (e.g. "no minimum", "until cleared")."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: more than a year of seconds")
    return value


def arg_pid(text: str) -> int:
    """A process id: a positive integer within Linux's range."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if not 0 < value <= MAX_PID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return value


def arg_address(text: str) -> int:
    """A code address: hex with 0x, or decimal; 64 bits at most."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (e.g. 0x4a1b2c)") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-bit address")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Refuses a bad command line with one line on stderr (and exit 2), not the usage
    block: the line names the argument and why; --help shows the rest."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


BUDGET_HELP = (
    "max share of one core the probes may cost {who} (default 0.01 = 1%%; 'none' for no "
    "limit; 0 allows no probe at all)"
)


def budget_arg(text: str) -> float:
    """--budget: a share of one core >= 0, or 'none' (no limit)."""
    if text.strip().lower() == "none":
        return float("inf")
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: give a share of one core such as 0.01, or 'none'"
        )
    return v


def _target_args(p: argparse.ArgumentParser, *, path: bool) -> None:
    """PATH or --pid PID: the binary on disk, or the one a running process executes."""
    if path:
        p.add_argument("path", nargs="?", help="Go executable to read")
    p.add_argument("--pid", type=arg_pid, help="read the executable of this running process")


# --- the control plane: its access options and the client -----------------------


def _auth_config(args: argparse.Namespace) -> Any:
    from goleash.control.auth import AuthConfig, Role

    return AuthConfig(
        token_files={
            Role.ADMIN: args.admin_token_file or (),
            Role.VIEWER: args.viewer_token_file or (),
            Role.AGENT: getattr(args, "agent_token_file", None) or (),
        },
        client_roles=getattr(args, "client_role", None) or (),
        insecure=args.insecure,
    )


def _client(args: argparse.Namespace) -> Any:
    from goleash.control.auth import client_token
    from goleash.control.client import ClientOptions, ControlClient

    return ControlClient(
        ClientOptions.from_env(
            server=args.server,
            token=client_token(args.token, args.token_file),
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            timeout=args.timeout,
        )
    )


def _token_args(g: Any, what: str) -> None:
    g.add_argument(
        "--token-file",
        help=f"file holding the bearer token of {what}; preferred over --token, "
        "whose value other users can see in the process list",
    )
    g.add_argument("--token", help="bearer token (default $GOLEASH_TOKEN; empty is an error)")


def _access_args(p: argparse.ArgumentParser, *, agent_tokens: bool) -> None:
    g = p.add_argument_group(
        "authentication",
        "Every RPC needs a role: agent (ingest), viewer (queries, events), admin (policy, "
        "overrides; includes viewer). Token files hold one token per line (`TOKEN` or "
        "`NAME TOKEN`; several lines rotate), also $GOLEASH_{ADMIN,VIEWER,AGENT}_TOKEN. "
        "With none configured only a loopback address is served.",
    )
    g.add_argument("--admin-token-file", action="append", help="tokens of the admin role")
    g.add_argument("--viewer-token-file", action="append", help="tokens of the viewer role")
    if agent_tokens:
        g.add_argument("--agent-token-file", action="append", help="tokens of the agent role")
        g.add_argument(
            "--client-role",
            action="append",
            metavar="IDENTITY=ROLE",
            help="give client certificates with this identity (SAN URI, SAN DNS or CN; a "
            "trailing * matches a prefix) a role; needs --tls-ca",
        )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback address without authentication (anyone reaching it may "
        "change the policy and trigger actions); logged loudly",
    )


def _server_args(p: argparse.ArgumentParser) -> None:
    from goleash.control import DEFAULT_SERVER

    g = p.add_argument_group("control plane connection")
    g.add_argument(
        "--server",
        help=f"control plane address (default $GOLEASH_SERVER or {DEFAULT_SERVER})",
    )
    _token_args(g, "this client's role (viewer to read, admin to change)")
    g.add_argument("--tls-ca", help="CA bundle to verify the server with (turns TLS on)")
    g.add_argument("--tls-cert", help="client certificate for mTLS")
    g.add_argument("--tls-key", help="client key for mTLS")
    g.add_argument(
        "--timeout", type=arg_seconds, default=10.0, help="seconds per call (default 10)"
    )


def _global_args(p: argparse.ArgumentParser) -> dict[str, Any]:
    """The options that may also come before the subcommand: logging and the control
    plane connection. Added with no default (a value given before the subcommand must
    survive the subcommand's defaults); returns the defaults they would have had."""
    first = len(p._actions)
    _log_args(p)
    _server_args(p)
    defaults = {}
    for action in p._actions[first:]:
        if action.default is not argparse.SUPPRESS:
            defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    return defaults


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_args(p: argparse.ArgumentParser) -> None:
    """--log-level/--log-format, on the top-level parser and every subcommand (never a
    default here: main() picks one per command)."""
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="least severe message logged (default: info for agent, control-plane and "
        "run; warning for the rest)",
    )
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="text (timestamped lines) or json (one object a line: time, level, logger, "
        "message), on stderr",
    )
