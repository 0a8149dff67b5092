"""How the control plane listens: TLS files re-read on renewal, and the listen check.

No unauthenticated port beyond loopback unless --insecure says so (logged loudly)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import grpc

from goleash.control import auth
from goleash.control.config import ControlPlaneConfig
from goleash.errors import GoleashError

log = logging.getLogger("goleash.control")


class ServerSetupError(GoleashError):
    """The server cannot start with this configuration."""


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost" or listen.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ServerSetupError(f"cannot read the {what} {path}: {exc.strerror}") from exc


class CertificateFiles:
    """The server's key, certificate and client CA, re-read when they change on disk
    (cert-manager renews them; Kubernetes swaps a Secret volume's files at once).
    gRPC asks before every new connection's handshake; a stat of three files is the
    cost, and connections are long-lived (one ingest stream per agent)."""

    def __init__(self, key: str, cert: str, ca: str | None) -> None:
        self.paths = tuple(p for p in (key, cert, ca) if p)
        self.key, self.cert, self.ca = key, cert, ca
        self._stamp = self._stat()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.paths:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def configuration(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=_read(self.ca, "TLS CA bundle") if self.ca else None,
        )

    def fetch(self) -> Any:
        """A new configuration when the files changed, else None (keep the current)."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            fresh = self.configuration()
        except (OSError, ServerSetupError) as exc:  # mid-update: the next connection retries
            log.warning("TLS files changed but cannot be read yet: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed on disk: new connections use them")
        return fresh


def server_credentials(cfg: ControlPlaneConfig) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert or cfg.tls_key or cfg.tls_ca):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ServerSetupError("TLS needs both --tls-cert and --tls-key (--tls-ca adds mTLS)")
    try:
        files = CertificateFiles(cfg.tls_key, cfg.tls_cert, cfg.tls_ca)
    except OSError as exc:
        raise ServerSetupError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files.fetch, require_client_authentication=cfg.tls_ca is not None
    )


def check_security(
    cfg: ControlPlaneConfig, authn: auth.Authenticator, creds: grpc.ServerCredentials | None
) -> None:
    """Refuse what would serve the API unprotected; warn about what is merely weak."""
    if authn.rules and not cfg.tls_ca:
        raise ServerSetupError(
            "--client-role maps client certificates to roles, which needs mTLS: "
            "add --tls-cert, --tls-key and --tls-ca"
        )
    if is_loopback(cfg.listen):
        return
    if not authn.enabled:
        if not cfg.credentials.insecure:
            raise ServerSetupError(
                f"refusing to listen on {cfg.listen} without authentication: anyone who "
                "can reach it could set a policy (and run its actions) or feed it data. "
                "Give tokens (--admin-token-file, --viewer-token-file, --agent-token-file) "
                "and/or client certificate roles (--tls-ca with --client-role), listen "
                "on loopback, or pass --insecure to accept the risk"
            )
        for line in (
            "*" * 72,
            f"INSECURE: listening on {cfg.listen} with authentication OFF (--insecure).",
            "Anyone who can reach this port can change the policy, trigger its actions",
            "(restarts, commands, webhooks, files) and read everything. Do not run it",
            "like this anywhere but an isolated test network.",
            "*" * 72,
        ):
            log.warning("%s", line)
    elif creds is None and authn.tokens:
        log.warning(
            "listening on %s without TLS: bearer tokens cross the network in plaintext; "
            "configure --tls-cert/--tls-key (and --tls-ca for mTLS)",
            cfg.listen,
        )
