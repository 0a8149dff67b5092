"""`goleash record --service` and `goleash diff --service A --against B`: recordings
composed from the control plane's queries, over a real gRPC socket."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_control_plane import (  # noqa: E402
    LEAK,
    ControlPlaneProcess,
    cli,
    feed_shop,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    cp = ControlPlaneProcess(tmp_path / "goleash.db")
    try:
        with grpc.insecure_channel(cp.address) as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            feed_shop(ch)
        yield cp.address
    finally:
        cp.stop()


def test_record_a_service_from_the_control_plane(server: str, tmp_path: Path) -> None:
    out = tmp_path / "shop.json"
    cli("record", "--service", "shop", "--window", "300", "--func", "main.callBackend",
        "-o", str(out), "--server", server)  # fmt: skip
    rec = json.loads(out.read_text())
    assert rec["build"]["go_version"] == "go1.22.10"
    leak = next(s for s in rec["sites"] if s["function"] == LEAK[0])
    assert leak["go_statement"] == LEAK[1] and leak["live_end"] == 50
    (fn,) = rec["functions"]
    assert (
        fn["symbol"] == "main.callBackend" and fn["count"] == 500
    )  # FAST + SLOW, both shop processes
    assert fn["p50_ns"] and fn["p99_ns"] > fn["p50_ns"]


def test_diff_two_services(server: str) -> None:
    same = cli("diff", "--service", "shop", "--against", "shop", "--fail-on", "growth,new-site",
               "--json", "--server", server)  # fmt: skip
    d = json.loads(same.stdout)
    assert d["failed"] == [] and d["flagged"] == 0
    other = cli("diff", "--service", "shop", "--against", "cart", "--fail-on", "new-site",
                "--server", server, check=False)  # fmt: skip
    assert other.returncode == 1, other.stderr
    assert "new" in other.stdout and LEAK[0] in other.stdout


def test_diff_needs_two_reports_or_two_services(server: str) -> None:
    r = cli("diff", "--service", "shop", "--server", server, check=False)
    assert r.returncode == 2 and "--against" in r.stderr
