"""The policy engine's evidence files over HTTP, so alerts link to them.

`GET /evidence/NAME` serves one file the engine wrote in its report directory: a
flame graph (`.svg`), folded stacks (`.folded`) or a pprof profile (`.pb.gz`, which
`go tool pprof http://HOST/evidence/NAME` reads directly). Nothing else: no
listing, no subdirectories, no symlinks, names from a strict alphabet, so a link
cannot be turned into a read of any other file. Alerts carry
`control-plane --external-url` + `/evidence/NAME` (generatorURL in Alertmanager).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError

log = logging.getLogger("goleash.control")

TYPES = {
    ".svg": "image/svg+xml",
    ".folded": "text/plain; charset=utf-8",
    ".pb.gz": "application/octet-stream",
}
NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
MAX_BYTES = 64 << 20  # far above any flame graph the engine writes


class EvidenceListenError(GoleashError):
    pass


def _content_type(name: str) -> str | None:
    return next((t for suffix, t in TYPES.items() if name.endswith(suffix)), None)


class EvidenceServer:
    """A small threaded HTTP server over `report_dir`; `address` is HOST:PORT."""

    def __init__(self, listen: str, report_dir: str | Path) -> None:
        host, _, port = listen.rpartition(":")
        root = Path(report_dir)

        class Handler(BaseHTTPRequestHandler):
            server_version = "goleash-evidence"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("evidence: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                name = path.removeprefix("/evidence/")
                ctype = _content_type(name)
                if name == path or not NAME.fullmatch(name) or ctype is None or ".." in name:
                    return self._fail(404, "no such evidence")
                try:
                    fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    return self._fail(404, "no such evidence")
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
                        return self._fail(404, "no such evidence")
                    data = f.read(MAX_BYTES)
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Content-Type-Options", "nosniff")
                # an SVG opened in a browser runs nothing: ours has no script anyway
                self.send_header(
                    "Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"
                )
                self.end_headers()
                self.wfile.write(data)

            def _fail(self, code: int, message: str) -> None:
                body = (message + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self._server = ThreadingHTTPServer(
                (host.strip("[]") or "127.0.0.1", int(port)), Handler
            )
        except (OSError, ValueError) as exc:
            raise EvidenceListenError(
                f"cannot listen on --evidence-listen {listen}: {exc}"
            ) from exc
        self._server.daemon_threads = True
        self.address = f"{host or '127.0.0.1'}:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="goleash-evidence", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
