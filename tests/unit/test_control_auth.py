"""control/auth.py as pure logic: token files, client token sources, certificate
identities, principals, and the redaction of secrets in policy text. The same code
runs against real sockets in tests/e2e/test_hostile_auth.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from goleash.control import auth
from goleash.control.auth import (
    ANONYMOUS,
    LOCAL,
    AuthConfig,
    Authenticator,
    AuthSetupError,
    Role,
    client_token,
    read_token_file,
    redact_policy,
)

TOKEN = "0123456789abcdef0123456789abcdef"


def test_token_files_name_their_tokens_and_refuse_empty_or_weak_ones(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# two agents\nnode-a {TOKEN}\n\n{TOKEN[::-1]}\n")
    assert read_token_file(str(f)) == [("node-a", TOKEN), ("", TOKEN[::-1])]
    for text, message in (
        ("", "holds no token"),
        ("\n# nothing\n", "holds no token"),
        ("short\n", "at least 16"),
        (f"a b {TOKEN}\n", "expected `TOKEN` or `NAME TOKEN`"),
        (f"bad\x1bname {TOKEN}\n", "is not"),
        ("tök" * 8 + "\n", "printable ASCII"),
    ):
        f.write_text(text)
        with pytest.raises(AuthSetupError, match=message):
            read_token_file(str(f))
    with pytest.raises(AuthSetupError, match="cannot read the token file"):
        read_token_file(str(tmp_path / "missing"))


def test_a_client_sends_one_token_and_an_empty_source_is_an_error(tmp_path: Path) -> None:
    assert client_token(env={}) is None
    assert client_token(env={"GOLEASH_TOKEN": f" {TOKEN}\n"}) == TOKEN
    for empty in ("", "  \n"):
        with pytest.raises(AuthSetupError, match="GOLEASH_TOKEN is set but empty"):
            client_token(env={"GOLEASH_TOKEN": empty})
    f = tmp_path / "t"
    f.write_text(TOKEN + "\n")
    # the file wins over the environment
    assert client_token(token_file=str(f), env={"GOLEASH_TOKEN": ""}) == TOKEN
    f.write_text(f"old {TOKEN}\nnew {TOKEN[::-1]}\n")  # mid-rotation: the newest
    assert client_token(token_file=str(f)) == TOKEN[::-1]
    with pytest.raises(AuthSetupError, match="--token is empty"):
        client_token(token="")


def _authn(tmp_path: Path, **env: str) -> Authenticator:
    (tmp_path / "agents").write_text(f"node-a {TOKEN}\n")
    cfg = AuthConfig(
        token_files={Role.AGENT: [str(tmp_path / "agents")]},
        client_roles=["spiffe://x/admin=admin", "goleash-agent-*=agent"],
    )
    return Authenticator.from_config(cfg, environ=env)


def test_principals_from_tokens_and_certificates(tmp_path: Path) -> None:
    admin_token = "A" * 20
    a = _authn(tmp_path, GOLEASH_ADMIN_TOKEN=admin_token)
    md = [("authorization", f"Bearer {TOKEN}")]
    p = a.authenticate(md, {})
    assert p is not None and (p.name, p.roles, p.via) == ("node-a", {Role.AGENT}, "token")
    p = a.authenticate([("authorization", f"bearer {admin_token}")], {})
    assert p is not None and p.roles == {Role.ADMIN, Role.VIEWER} and p.name == "admin-token"
    assert a.authenticate([("authorization", "Bearer nope")], {}) is None
    assert a.authenticate([("authorization", f"Token {TOKEN}")], {}) is None
    assert a.authenticate([], {}) is ANONYMOUS
    cert = {"x509_common_name": [b"someone"], "peer_uri": [b"spiffe://x/admin"]}
    p = a.authenticate([], cert)
    assert p is not None and p.name == "spiffe://x/admin" and p.via == "certificate"
    p = a.authenticate([], {"x509_common_name": [b"goleash-agent-node7"]})
    assert p is not None and p.roles == {Role.AGENT}
    # a prefix rule matches a prefix, not anything containing it
    assert a.authenticate([], {"x509_common_name": [b"x-goleash-agent-1"]}) is ANONYMOUS
    # a token decides on its own, even beside a certificate with a role
    assert a.authenticate([("authorization", "Bearer nope")], cert) is None
    # nothing configured: authentication off, everyone is the local principal
    assert Authenticator.from_config(AuthConfig(), environ={}).authenticate([], {}) is LOCAL


def test_configuration_errors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthSetupError, match="GOLEASH_VIEWER_TOKEN is empty"):
        _authn(tmp_path, GOLEASH_VIEWER_TOKEN="")
    with pytest.raises(AuthSetupError, match="one token, one role"):
        _authn(tmp_path, GOLEASH_ADMIN_TOKEN=TOKEN)
    for rule, message in (
        ("admin", "IDENTITY=ROLE"),
        ("x=root", "role must be"),
        ("*=admin", "not every certificate"),
    ):
        with pytest.raises(AuthSetupError, match=message):
            auth.parse_identity_rule(rule)


def test_admin_implies_viewer_and_agent_implies_nothing_else() -> None:
    assert auth.GRANTS[Role.ADMIN] == {Role.ADMIN, Role.VIEWER}
    assert auth.GRANTS[Role.AGENT] == {Role.AGENT}
    assert auth.GRANTS[Role.VIEWER] == {Role.VIEWER}
    # ingest is the agent's alone; changes the admin's alone
    assert auth.RPC_ROLES["/goleash.v1.IngestService/StreamBatches"] is Role.AGENT
    changes = {m for m, r in auth.RPC_ROLES.items() if r is Role.ADMIN}
    assert changes == {
        "/goleash.v1.GoleashService/SetPolicy",
        "/goleash.v1.GoleashService/OverrideService",
    }


POLICY = """\
# comments stay
mode: enforce
rules:
  - name: hook
    levels:
      - level: L3
        actions:
          - type: webhook
            url: https://user:pa55@hooks.example/x?team=a   # userinfo goes
            headers:
              Authorization: Bearer s3cr3t-1
              X-Api: s3cr3t-2
          - {type: exec, command: [notify], env: {API_TOKEN: s3cr3t-3, LEVEL: high}}
          - type: webhook
            url: https://hooks.example/y
            headers: {Cookie: s3cr3t-4}
          - type: kubernetes
            kubeconfig: /etc/kube
            password: |
              s3cr3t-5
"""


def test_redaction_removes_every_secret_and_keeps_the_rest() -> None:
    out = redact_policy(POLICY)
    for n in range(1, 6):
        assert f"s3cr3t-{n}" not in out
    assert "pa55" not in out and "user:" not in out
    assert "# comments stay" in out and "# userinfo goes" in out
    doc = yaml.safe_load(out)
    a0, a1, a2, a3 = doc["rules"][0]["levels"][0]["actions"]
    assert a0["url"] == "https://<redacted>@hooks.example/x?team=a"
    assert a0["headers"] == {"Authorization": "<redacted>", "X-Api": "<redacted>"}
    assert a1["env"] == {"API_TOKEN": "<redacted>", "LEVEL": "high"}
    assert a2 == {"type": "webhook", "url": "https://hooks.example/y",
                  "headers": {"Cookie": "<redacted>"}}  # fmt: skip
    assert a3["kubeconfig"] == "/etc/kube" and a3["password"] == "<redacted>"
    # aliases do not make the same span be replaced twice
    aliased = "a: &h {Authorization: x-secret}\nheaders: *h\n"
    assert "x-secret" not in redact_policy(aliased)
    assert yaml.safe_load(redact_policy(aliased))["a"]["Authorization"] == "<redacted>"


def test_text_that_cannot_be_parsed_is_withheld_whole() -> None:
    out = redact_policy("headers: {Authorization: s3cret\n")
    assert "s3cret" not in out and "<redacted>" in out


def test_events_are_scrubbed_of_credentials_before_they_are_stored() -> None:
    from goleash.api.goleash.v1 import types_pb2 as t
    from goleash.control.events import open_db
    from goleash.control.server import ScrubbedEventLog

    log = ScrubbedEventLog(open_db(":memory:"), clock=lambda: 1.0)
    log.append(
        t.EVENT_KIND_ACTION,
        "POST https://bot:pw-s3cr3t@hooks.example/x failed: 401 (sent Bearer abc.s3cr3t)",
        service="shop",
        details={
            "action": {"type": "webhook", "headers": {"X-Key": "s3cr3t"}, "timeout": 5},
            "api_key": "s3cr3t",
            "attempts": [{"url": "http://u:s3cr3t@h/"}],
            "level": "L3",
        },
    )
    (e,) = log.query()
    assert "s3cr3t" not in e.message and "s3cr3t" not in repr(e.details)
    assert e.message.startswith("POST https://<redacted>@hooks.example/x failed: 401")
    assert e.details["action"] == {"type": "webhook", "headers": {"X-Key": "<redacted>"},
                                   "timeout": 5}  # fmt: skip
    assert e.details["level"] == "L3" and e.service == "shop"


def test_token_files_are_reloaded_when_they_change_and_kept_when_broken(tmp_path: Path) -> None:
    import os

    f = tmp_path / "admin"
    f.write_text(TOKEN + "\n")
    cfg = AuthConfig(token_files={Role.ADMIN: [str(f)]}, env=False)
    first = Authenticator.from_config(cfg)
    assert auth.reloaded(first, cfg) is first  # unchanged: no re-read

    def replace(text: str) -> None:  # how a Secret volume swaps its files
        (tmp_path / "new").write_text(text)
        os.replace(tmp_path / "new", f)

    def who(a: Authenticator, token: str) -> auth.Principal | None:
        return a.authenticate([("authorization", f"Bearer {token}")], {})

    replace(f"{TOKEN}\n{TOKEN[::-1]}\n")  # mid-rotation: both
    second = auth.reloaded(first, cfg)
    assert who(second, TOKEN) is not None and who(second, TOKEN[::-1]) is not None
    replace("")  # a broken update keeps the tokens that work
    assert auth.reloaded(second, cfg) is second
    assert who(second, TOKEN[::-1]) is not None
    replace(TOKEN[::-1] + "\n")
    third = auth.reloaded(second, cfg)
    assert who(third, TOKEN) is None and who(third, TOKEN[::-1]) is not None
