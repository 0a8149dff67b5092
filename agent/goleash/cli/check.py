"""The leak gate: check."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

# --- check: the leak gate ------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from goleash.node.check import (
        CheckUsageError,
        IgnoreList,
        load_baseline,
        print_report,
        run_check,
        write_junit,
    )

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CheckUsageError("nothing to run: goleash check [OPTIONS] -- CMD [ARGS...]")
    ignore = IgnoreList.load(args.ignore_file) if args.ignore_file else IgnoreList()
    ignore.top.update(args.ignore_top)
    ignore.sites.update(args.ignore_site)
    ignore.functions.update(args.ignore_function)
    baseline = load_baseline(args.baseline) if args.baseline else set()
    rep = run_check(command, ignore=ignore, baseline=baseline, stdout_to_stderr=args.json)
    print_report(rep, as_json=args.json)
    if args.junit:
        write_junit(rep, args.junit)
    if sys.argv[-len(args.cmd) :] == args.cmd:
        _exit_now(rep.exit_status())
    return rep.exit_status()


def _exit_now(status: int) -> None:
    """End the `goleash check` process once its report is out. Its job is done, and
    Python's teardown of the binary-analysis modules costs 0.1-0.4 s here, added to
    every CI job's wall time (issue 13 budgets the whole run at 1.5x `go test`).
    Only when check is this process's command (an in-process caller gets the status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def cmd_prepare(args: argparse.Namespace) -> int:
    from goleash.node.check import prepare

    done = prepare()
    what = "compiled and cached" if done.compiled else "already cached"
    print(f"goleash check's BPF program: {what} in {done.cache_dir} ({done.seconds:.1f}s)")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="compile goleash check's BPF program for this kernel ahead of time",
        description=(
            "Compile the BPF program `goleash check` loads, for this kernel and BCC, into "
            "goleash's cache ($XDG_CACHE_HOME/goleash, else /var/cache/goleash), as an "
            "install step (scripts/setup.sh runs it). A check then starts without "
            "compiling; without it the first check compiles. Run it again after a kernel "
            "or goleash upgrade (a stale program is never used: check compiles). Needs root."
        ),
    )
    p.set_defaults(handler=cmd_prepare)
    p = sub.add_parser(
        "check",
        help="run a command; fail when Go programs it starts leak goroutines (CI gate)",
        description=(
            "Run CMD (e.g. `go test ./...`) and follow every Go program it starts, "
            "transitively (the Go toolchain itself is skipped). Goroutines are attributed "
            "to the test that created them; one still blocked after its test ended, or "
            "blocked when its process exits, is a leak. Exit 1 on leaks, 0 clean, 2 on "
            "bad usage or environment; a non-zero exit of CMD is returned as is. Needs root."
        ),
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the report as JSON on stdout (the command's own stdout goes to stderr)",
    )
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML file")
    p.add_argument(
        "--ignore-top",
        action="append",
        default=[],
        metavar="FUNC",
        help="not a leak when FUNC is the topmost non-runtime frame (repeatable)",
    )
    p.add_argument(
        "--ignore-site",
        action="append",
        default=[],
        metavar="FILE:LINE",
        help="not a leak when created by the go statement at FILE:LINE (repeatable)",
    )
    p.add_argument(
        "--ignore-function",
        action="append",
        default=[],
        metavar="FUNC",
        help="not a leak when the goroutine started with FUNC (repeatable)",
    )
    p.add_argument(
        "--ignore-file",
        metavar="YAML",
        help="ignore list: `ignore: [{top: FUNC}, {site: FILE:LINE}, {function: FUNC}]`",
    )
    p.add_argument(
        "--baseline",
        metavar="REPORT.json",
        help="a stored --json report: fail only on leaks not in it",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(handler=cmd_check)
