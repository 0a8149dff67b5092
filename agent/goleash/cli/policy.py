"""The policy engine's commands: policy, override, decisions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from goleash.cli.options import (
    _client,
    _server_args,
    arg_seconds_or_zero,
    print_json,
)
from goleash.errors import GoleashError

# --- policy engine: policy, overrides, decisions ---------------------------------------


def cmd_policy(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q

    if args.action == "check":
        from goleash.control.engine import check_policy_text

        pol = check_policy_text(_read_policy(args.file))
        print(f"{args.file}: ok ({pol.mode}, {len(pol.rules)} rule(s))")
        return 0
    with _client(args) as c:
        if args.action == "get":
            resp = c.call("GetPolicy", q.GetPolicyRequest())
            if args.json:
                from google.protobuf import json_format

                print_json(json_format.MessageToDict(resp))
            elif not resp.version:
                print("no policy set", file=sys.stderr)
            else:
                mode = q.PolicyMode.Name(resp.mode).removeprefix("POLICY_MODE_").lower()
                print(f"# version {resp.version} from {resp.source} ({mode})")
                sys.stdout.write(resp.policy_yaml)
                for o in resp.overrides:
                    what = q.OverrideAction.Name(o.action).removeprefix("OVERRIDE_ACTION_")
                    print(f"# override {o.id}: {o.service} {what.lower()} {o.rule or o.level}")
            return 0
        resp = c.call(
            "SetPolicy",
            q.SetPolicyRequest(policy_yaml=_read_policy(args.file), validate_only=args.dry_run),
        )
    mode = q.PolicyMode.Name(resp.mode).removeprefix("POLICY_MODE_").lower()
    verb = "valid; version" if args.dry_run else "running: version"
    print(f"{args.file}: {verb} {resp.version} ({mode}, {resp.rules} rule(s))")
    return 0


def _read_policy(path: str) -> str:
    if path == "-" and sys.stdin.isatty():
        # Reading a terminal would wait for a policy typed by hand: say what is missing.
        raise GoleashError("give a policy YAML file (or - with the policy piped on stdin)")
    try:
        return sys.stdin.read() if path == "-" else open(path).read()
    except OSError as exc:
        raise GoleashError(f"cannot read {path}: {exc.strerror}") from exc


def cmd_override(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q

    actions = {
        "pause": q.OVERRIDE_ACTION_PAUSE_RULE,
        "degrade": q.OVERRIDE_ACTION_FORCE_DEGRADE,
        "recover": q.OVERRIDE_ACTION_FORCE_RECOVER,
        "clear": q.OVERRIDE_ACTION_CLEAR,
    }
    if args.action == "pause" and not args.rule:
        raise GoleashError("pause needs --rule NAME (the rule to stop evaluating)")
    req = q.OverrideServiceRequest(
        service=args.service,
        action=actions[args.action],
        rule=args.rule or "",
        level=args.level or "",
        duration_seconds=args.duration,
        reason=args.reason or "",
    )
    with _client(args) as c:
        resp = c.call("OverrideService", req)
    if args.action == "clear":
        print(f"{args.service}: {resp.cleared} override(s) cleared")
    else:
        until = f" for {args.duration:g}s" if args.duration else " until cleared"
        print(f"{args.service}: override {resp.override.id} ({args.action}){until}")
    return 0


def cmd_decisions(args: argparse.Namespace) -> int:
    from goleash.api.goleash.v1 import goleash_service_pb2 as q
    from goleash.control import views

    with _client(args) as c:
        resp = c.call(
            "ListDecisions",
            q.ListDecisionsRequest(service=args.service or "", page_size=args.limit),
        )
    found = sorted(resp.decisions, key=lambda e: e.id)
    if args.json:
        print_json([views.event_dict(e) for e in found])
    else:
        for e in found:
            print(views.event_line(e))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="the policy engine's policy: check a file, set it, show the running one",
        description=(
            "check: validate a policy file the way the control plane will (line and reason "
            "on error), offline. set: make it the running policy (validated first; a bad one "
            "is rejected and the old one keeps running). get: the running policy, its "
            "version and the active overrides."
        ),
        epilog=(
            "examples:\n  goleash policy check policy.yaml\n  goleash policy set policy.yaml\n"
            "  goleash policy set --dry-run policy.yaml\n  goleash policy get"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("check", "set", "get"))
    p.add_argument("file", nargs="?", default="-", help="policy YAML (check, set; - is stdin)")
    p.add_argument("--dry-run", action="store_true", help="set: only validate on the server")
    p.add_argument("--json", action="store_true", help="get: JSON on stdout")
    _server_args(p)
    p.set_defaults(handler=cmd_policy)

    p = sub.add_parser(
        "override",
        help="pause a rule for a service, force it degraded or recovered, or clear that",
        description=(
            "Manual overrides of the policy engine for one service: `pause` stops one rule "
            "(--rule), `degrade` forces it to a level (--level, default the highest) now, "
            "`recover` forces it back and holds it there, `clear` removes its overrides. The "
            "policy's mode still applies (monitor only records). Needs the token if one is set."
        ),
        epilog=(
            "examples:\n  goleash override shop/checkout degrade --level L3 --reason drill\n"
            "  goleash override shop/checkout pause --rule goroutine-levels --duration 3600\n"
            "  goleash override shop/checkout clear"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("service", help="service name, as `goleash ps` shows it")
    p.add_argument("action", choices=("pause", "degrade", "recover", "clear"))
    p.add_argument("--rule", help="the rule (pause; degrade/recover: only this rule)")
    p.add_argument("--level", help="degrade: the level, e.g. L2 (default the highest)")
    p.add_argument(
        "--duration",
        type=arg_seconds_or_zero,
        default=0.0,
        help="seconds (default: until cleared)",
    )
    p.add_argument("--reason", help="why, for the event log")
    _server_args(p)
    p.set_defaults(handler=cmd_override)

    p = sub.add_parser(
        "decisions",
        help="what the policy engine decided and every action attempt, with evidence",
        description="Decisions (degrade, recover, hold) and action attempts, oldest first.",
        epilog="examples:\n  goleash decisions --service shop/checkout --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--service", help="only this service")
    p.add_argument("--limit", type=int, default=50, help="how many of the latest (default 50)")
    p.add_argument("--json", action="store_true", help="a JSON list with the evidence")
    _server_args(p)
    p.set_defaults(handler=cmd_decisions)
