"""The `goleash` parser (global options, subcommands, options anywhere), logging
setup, and main: run a subcommand and turn its failure into an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from goleash import __version__
from goleash.cli import binary, check, daemons, local, policy, queries, record
from goleash.cli.options import (
    Handler,
    OneLineParser,
    _global_args,
    _log_args,
)
from goleash.errors import GoleashError

# --- the parser ----------------------------------------------------------------


# `goleash check` runs in every CI job, its wall time budgeted against `go test`'s:
# for it (and `prepare`) the parser holds its own group only (1 ms, not 14).
_ALONE = {"check": check.add_commands, "prepare": check.add_commands}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, or with ONLY (a command of _ALONE) that command's group."""
    parser = OneLineParser(
        prog="goleash",
        description=(
            "Watch Go services from the outside: goroutine lifetimes, leaks and function "
            "latency via eBPF uprobes and process memory. No code change, no restart."
        ),
        epilog="Run `goleash COMMAND --help` for the details of each command.",
    )
    parser.add_argument("--version", action="version", version=f"goleash {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    if only in _ALONE:
        _ALONE[only](sub)
    else:
        binary.add_commands(sub)
        local.add_commands(sub)
        daemons.add_control_plane_command(sub)
        queries.add_commands(sub)
        daemons.add_agent_commands(sub)
        policy.add_commands(sub)
        check.add_commands(sub)
        record.add_commands(sub)

    _global_args(parser)  # for --help; parse_args() parses them with _globals_parser()
    for command in sub.choices.values():
        _log_args(command)
    parser.set_defaults(commands=sub.choices)
    return parser


_ONE_TARGET_COMMANDS = frozenset({"inspect", "symbolize", "trace", "latency", "panics", "dump"})


def _printable(text: str) -> str:
    """A message for a terminal: control characters that can come from a binary's or
    a process's strings (escape sequences, carriage returns) shown escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _globals_parser() -> tuple[argparse.ArgumentParser, dict[str, Any], frozenset[str]]:
    """The global options alone: a parser, their defaults, and those taking a value."""
    p = argparse.ArgumentParser(prog="goleash", add_help=False)
    defaults = _global_args(p)
    valued = frozenset(s for a in p._actions if a.nargs != 0 for s in a.option_strings)
    return p, defaults, valued


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Global options, the subcommand, then its options and positionals in any order.

    argparse alone would let a subcommand's defaults overwrite a global option given
    before it, report a subcommand's bad option with the top-level usage, and refuse
    an option between two positionals (`policy set --dry-run FILE`); so the line is
    split at the subcommand and its part parsed intermixed by its own parser."""
    globals_parser, defaults, valued = _globals_parser()
    parser = build_parser(_command_word(argv, valued))
    _autocomplete(parser)
    commands: dict[str, argparse.ArgumentParser] = parser.get_default("commands")
    i = 0
    while i < len(argv) and argv[i] not in commands:
        name, eq, _ = argv[i].partition("=")
        if name not in valued:
            return parser.parse_args(argv)  # --help, --version or an error: top-level's
        i += 1 if eq else 2
    if i >= len(argv):
        return parser.parse_args(argv)  # no subcommand: argparse says which are known
    ns = globals_parser.parse_args(argv[:i])
    command = commands[argv[i]]
    # A command that runs another command line (`check -- CMD ARGS`) keeps that line
    # whole: argparse cannot intermix options with a REMAINDER positional.
    takes_command_line = any(a.nargs == argparse.REMAINDER for a in command._actions)
    parse = command.parse_args if takes_command_line else command.parse_intermixed_args
    args = parse(argv[i + 1 :], namespace=ns)
    args.command = argv[i]
    for key, value in defaults.items():  # commands without connection options
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def _command_word(argv: Sequence[str], valued: frozenset[str]) -> str | None:
    """The subcommand's word when the line has one after the global options (None
    under shell completion: that needs every command)."""
    if "_ARGCOMPLETE" in os.environ:
        return None
    i = 0
    while i < len(argv):
        name, eq, _ = argv[i].partition("=")
        if name not in valued:
            return argv[i]
        i += 1 if eq else 2
    return None


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Shell completion when the shell asks (`eval "$(register-python-argcomplete
    goleash)"`); argcomplete is optional: without it there is simply none. It
    completes only when the shell set _ARGCOMPLETE: else not even imported (7 ms)."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


DAEMONS = frozenset(("agent", "control-plane", "run"))


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "command": self.command,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class TextLogFormatter(logging.Formatter):
    def __init__(self, command: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s goleash {command}: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _rfc3339(record.created)


def setup_logging(args: argparse.Namespace) -> None:
    """Root logging on stderr, as --log-level/--log-format say (the daemons' own
    basicConfig calls then find it set and change nothing)."""
    level = getattr(args, "log_level", None) or ("info" if args.command in DAEMONS else "warning")
    fmt = getattr(args, "log_format", None) or "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter(args.command) if fmt == "json" else TextLogFormatter(args.command)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        if getattr(old, "goleash_cli", False):
            root.removeHandler(old)
    handler.goleash_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args)
    handler: Handler = args.handler
    try:
        return handler(args)
    except GoleashError as exc:
        print(f"goleash {args.command}: {_printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        # Commands that read one process or one file meet whatever it holds: a failure
        # there is a message and exit 2, not a traceback (GOLEASH_DEBUG=1 shows it).
        if args.command not in _ONE_TARGET_COMMANDS or os.environ.get("GOLEASH_DEBUG"):
            raise
        print(
            f"goleash {args.command}: failed: {type(exc).__name__}: {_printable(str(exc))} "
            "(set GOLEASH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 2
