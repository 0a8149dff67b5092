"""`exec`: run a command with the decision in its environment and as JSON on stdin.

The command (a list, or a string split like a shell would, without a shell) runs
with the control plane's environment plus:

  GOLEASH_DECISION      degrade | recover
  GOLEASH_DECISION_ID   id of the DECISION event (the same for every retry: dedupe on it)
  GOLEASH_SERVICE, GOLEASH_RULE, GOLEASH_LEVEL, GOLEASH_FROM_LEVEL, GOLEASH_TO_LEVEL
  GOLEASH_REASON        one line a person can read
  GOLEASH_ENV           the environment to restart the service with on degrade
                        (`NAME=value` lines; empty on recover), e.g. GODEBUG=http2client=0,...
  GOLEASH_GODEBUG       its GODEBUG value alone (empty on recover)
  GOLEASH_FLAMEGRAPH    path of the SVG flame graph of the evidence, when one was written

and the decision with its evidence as one JSON object on stdin. Exit 0 is success;
anything else is a failed attempt (retried). `recover_command` runs on recovery
instead of `command` when given.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from typing import Any

from goleash.control.actions import (
    DEGRADE,
    Action,
    ActionContext,
    ActionError,
    ActionSpecError,
    env_spec,
    seconds,
)

DEFAULT_TIMEOUT = 30.0


def _argv(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list) and all(isinstance(a, str | int | float) for a in value):
        argv = [str(a) for a in value]
    else:
        raise ActionSpecError(key, f"{key} must be a list of arguments or a string")
    if not argv:
        raise ActionSpecError(key, f"{key} is empty")
    return argv


class ExecAction(Action):
    type = "exec"
    keys = ("command", "recover_command", "env", "timeout_seconds", "cwd")

    def check(self) -> None:
        if "command" not in self.spec:
            raise ActionSpecError("command", "an exec action needs command:")
        _argv(self.spec["command"], "command")
        if "recover_command" in self.spec:
            _argv(self.spec["recover_command"], "recover_command")
        seconds(self.spec, "timeout_seconds", DEFAULT_TIMEOUT, positive=True)
        env_spec(self.spec)

    def key(self, service: str) -> str:
        return f"exec:{service}:{json.dumps(self.spec.get('command'))}"

    def _command(self, ctx: ActionContext) -> list[str]:
        if ctx.direction != DEGRADE and "recover_command" in self.spec:
            return _argv(self.spec["recover_command"], "recover_command")
        return _argv(self.spec["command"], "command")

    def describe(self, ctx: ActionContext) -> str:
        return shlex.join(self._command(ctx))

    def environment(self, ctx: ActionContext) -> dict[str, str]:
        degrade = ctx.direction == DEGRADE
        want = env_spec(self.spec) if degrade else {}
        env = dict(os.environ)
        env.update(
            GOLEASH_DECISION=ctx.direction,
            GOLEASH_DECISION_ID=str(ctx.decision_id),
            GOLEASH_SERVICE=ctx.service,
            GOLEASH_RULE=ctx.rule,
            GOLEASH_LEVEL=ctx.level,
            GOLEASH_FROM_LEVEL=ctx.from_level,
            GOLEASH_TO_LEVEL=ctx.to_level,
            GOLEASH_REASON=ctx.reason,
            GOLEASH_ENV="".join(f"{k}={v}\n" for k, v in want.items()),
            GOLEASH_GODEBUG=want.get("GODEBUG", ""),
            GOLEASH_FLAMEGRAPH=str(ctx.evidence.get("flamegraph_svg", "")),
        )
        return env

    def _run(self, ctx: ActionContext) -> str:
        argv = self._command(ctx)
        timeout = float(self.spec.get("timeout_seconds", DEFAULT_TIMEOUT))
        stdin = json.dumps(ctx.as_dict(), default=str)
        try:
            res = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                env=self.environment(ctx),
                cwd=self.spec.get("cwd") or None,
                timeout=timeout,
            )
        except FileNotFoundError as exc:
            raise ActionError(f"{argv[0]}: no such command", retryable=False) from exc
        except PermissionError as exc:
            raise ActionError(f"{argv[0]}: not executable", retryable=False) from exc
        except subprocess.TimeoutExpired as exc:
            raise ActionError(f"{shlex.join(argv)} still running after {timeout:g}s") from exc
        tail = (res.stderr or res.stdout).strip()[-500:]
        if res.returncode != 0:
            raise ActionError(
                f"{argv[0]} exited with {res.returncode}" + (f": {tail}" if tail else "")
            )
        return f"{argv[0]} exited 0" + (f": {tail}" if tail else "")

    def apply(self, ctx: ActionContext) -> str:
        return self._run(ctx)

    def undo(self, ctx: ActionContext) -> str:
        return self._run(ctx)
