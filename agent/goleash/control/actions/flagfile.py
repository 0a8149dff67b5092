"""`file`: write a flag file on degrade, remove it on recovery.

For services, supervisors or proxies that watch a file: by default it holds the
environment to restart with (`GODEBUG=http2client=0,http2server=0`, one
`NAME=value` a line, as systemd's EnvironmentFile reads it). Written atomically
(temporary file + rename), so a watcher never reads half of it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from goleash.control.actions import Action, ActionContext, ActionError, ActionSpecError, env_spec

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class FileAction(Action):
    type = "file"
    keys = ("path", "env", "content")

    def check(self) -> None:
        path = self.spec.get("path")
        if not isinstance(path, str) or not path:
            raise ActionSpecError("path", "a file action needs path: (where the flag file goes)")
        if _UNSAFE.search(path) or ".." in Path(path).parts:
            raise ActionSpecError(
                "path", "path must not contain '..' or control characters (NUL, newline...)"
            )
        if "content" in self.spec and not isinstance(self.spec["content"], str):
            raise ActionSpecError("content", "content must be a string")
        env_spec(self.spec)

    def _path(self, ctx: ActionContext) -> Path:
        """The flag file for this decision, checked after substitution: the service
        name comes from agents, so it can neither leave the policy's directory nor
        smuggle in control characters."""
        # {service} lets one action serve several services ("/run/goleash/{service}.env")
        template = str(self.spec["path"])
        name = ctx.service.replace("/", "_")
        if _UNSAFE.search(name) or name in (".", ".."):
            raise ActionError(
                f"service name {ctx.service[:80]!r} cannot be part of a file name", retryable=False
            )
        result = template.replace("{service}", name)
        fixed = template.split("{service}", 1)[0]
        directory = os.path.normpath(os.path.dirname(fixed) or ".")
        normal = os.path.normpath(result)
        if directory == ".":
            inside = not os.path.isabs(normal)
        else:
            inside = normal.startswith(directory.rstrip("/") + "/")
        if _UNSAFE.search(result) or ".." in Path(result).parts or not inside:
            raise ActionError(
                f"{result[:200]!r} is not a file under {directory} (the policy's directory)",
                retryable=False,
            )
        return Path(result)

    def key(self, service: str) -> str:
        return f"file:{str(self.spec['path']).replace('{service}', service.replace('/', '_'))}"

    def describe(self, ctx: ActionContext) -> str:
        return str(self._path(ctx))

    def content(self) -> str:
        if "content" in self.spec:
            return str(self.spec["content"])
        return "".join(f"{k}={v}\n" for k, v in env_spec(self.spec).items())

    def apply(self, ctx: ActionContext) -> str:
        path = self._path(ctx)
        body = self.content()
        try:
            if path.read_text() == body:
                return f"{path} already in place"
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ActionError(f"cannot read {path}: {exc.strerror}") from exc
        tmp = path.with_name(f".{path.name}.goleash-tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body)
            os.replace(tmp, path)
        except OSError as exc:
            raise ActionError(f"cannot write {path}: {exc.strerror}") from exc
        return f"wrote {path}"

    def undo(self, ctx: ActionContext) -> str:
        path = self._path(ctx)
        try:
            path.unlink()
        except FileNotFoundError:
            return f"{path} already absent"
        except OSError as exc:
            raise ActionError(f"cannot remove {path}: {exc.strerror}") from exc
        return f"removed {path}"
