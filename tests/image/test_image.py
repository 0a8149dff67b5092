"""The image, run the way deploy/kubernetes runs it: a control-plane container with
its port published, an agent container as the DaemonSet's pod (privileged, host PID
namespace, the same host mounts, --host-root /host, read-only root, /tmp a tmpfs)
dialing the control plane's address on the container network (as a Service), a Go
process started on the host, and the host's `goleash ps` asking the control plane
through the published port.

Needs the image (`make image`), podman, root. Prints start-up times.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from polling import wait_for
from populations import running_populations

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("GOLEASH_IMAGE", "localhost/goleash:0.1.0")
PODMAN = [str(REPO / "scripts" / "podman.sh")]
# root on this kind of VM lacks CAP_SYS_RESOURCE: podman's default raise fails
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# One token per role, as the manifests' Secret holds them: the control plane listens
# beyond loopback, so it refuses to start without credentials.
TOKENS = {
    role: f"image-test-{role}-{uuid.uuid4().hex[:8]}" for role in ("agent", "viewer", "admin")
}
CONTROL_PLANE_ENV = {f"GOLEASH_{role.upper()}_TOKEN": tok for role, tok in TOKENS.items()}
BIN = Path(sys.executable).parent / "goleash"
GOLEASH = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "goleash.cli"]
# The DaemonSet's volumeMounts (deploy/kubernetes/agent.yaml), host path -> container.
HOST_MOUNTS = [
    "/lib/modules:/lib/modules:ro",
    "/usr/src:/usr/src:ro",
    "/sys/kernel/debug:/sys/kernel/debug:ro",
    "/sys/kernel/tracing:/sys/kernel/tracing:ro",
    "/sys/fs/bpf:/sys/fs/bpf:ro",
    "/:/host:ro,rslave",
]


def podman(*args: str, timeout: float = 120) -> str:
    res = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, f"podman {' '.join(args)}: {res.stderr}"
    return res.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def container(name: str, *args: str, env: dict[str, str]) -> Iterator[str]:
    env_args = [arg for k, v in env.items() for arg in ("-e", f"{k}={v}")]
    podman("run", "-d", "--name", name, *ULIMITS, *env_args, *args)
    try:
        yield name
    finally:
        logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True)
        print(f"--- {name} log (tail)\n{(logs.stdout + logs.stderr)[-3000:]}")
        subprocess.run([*PODMAN, "rm", "-f", "-t", "5", name], capture_output=True)


def ps(port: int) -> list[dict]:
    res = subprocess.run(
        [*GOLEASH, "ps", "--server", f"127.0.0.1:{port}", "--json", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GOLEASH_TOKEN": TOKENS["viewer"]},
    )
    return list(json.loads(res.stdout)) if res.returncode == 0 else []


@pytest.fixture(scope="module", autouse=True)
def image_exists() -> None:
    podman("image", "exists", IMAGE)


def test_image_runs_only_the_runtime() -> None:
    """The image carries goleash and its runtime dependencies, no dev tools."""
    out = podman(
        "run",
        "--rm",
        *ULIMITS,
        "--entrypoint",
        "/opt/goleash/venv/bin/python",
        IMAGE,
        "-c",
        "import importlib.util as u, json; print(json.dumps({m: bool(u.find_spec(m)) for m in "
        "('bcc', 'goleash.probes.goroutines', 'kubernetes', 'grpc_health', 'pytest', 'ruff', "
        "'mypy', 'grpc_tools')}))",
    )
    found = json.loads(out.splitlines()[-1])
    assert found == {
        "bcc": True,
        "goleash.probes.goroutines": True,
        "kubernetes": True,
        "grpc_health": True,
        "pytest": False,
        "ruff": False,
        "mypy": False,
        "grpc_tools": False,
    }


def test_agent_container_follows_a_host_go_process_and_ps_reaches_the_control_plane() -> None:
    port = free_port()
    tag = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    with container(
        f"goleash-test-cp-{tag}",
        "-p",
        f"127.0.0.1:{port}:7070",
        "--tmpfs",
        "/var/lib/goleash",
        IMAGE,
        "control-plane",
        "--listen",
        "0.0.0.0:7070",
        "--health-listen",
        "0.0.0.0:7071",
        "--metrics-listen",
        "0.0.0.0:9464",
        "--db",
        "/var/lib/goleash/events.db",
        env=CONTROL_PLANE_ENV,
    ) as cp:
        # ps answers (an empty list) once the control plane serves
        wait_for(
            lambda: (
                subprocess.run(
                    [*GOLEASH, "ps", "--server", f"127.0.0.1:{port}", "--timeout", "2"],
                    capture_output=True,
                    env={**os.environ, "GOLEASH_TOKEN": TOKENS["viewer"]},
                ).returncode
                == 0
            ),
            timeout=60,
            what="the control plane answering through its port",
        )
        cp_ready = time.monotonic() - t0
        cp_ip = podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cp)
        assert cp_ip, "the control-plane container has no address on the container network"
        with running_populations("1.22.10", orphan=9, sleeper=3) as pop:
            t1 = time.monotonic()
            mounts = [arg for m in HOST_MOUNTS for arg in ("-v", m)]
            with container(
                f"goleash-test-agent-{tag}",
                "--privileged",
                "--pid=host",
                "--read-only",
                "--tmpfs",
                "/tmp",
                *mounts,
                IMAGE,
                "agent",
                "--server",
                f"{cp_ip}:7070",
                "--node-name",
                f"image-{tag}",
                "--host-root",
                "/host",
                "--interval",
                "1",
                "--health-listen",
                "0.0.0.0:7071",
                "--metrics-listen",
                "0.0.0.0:9464",
                "--exe",
                "*/populations",
                env={"GOLEASH_TOKEN": TOKENS["agent"]},
            ):

                def followed() -> dict | None:
                    for p in ps(port):
                        if p["pid"] == pop.pid and p["goroutines"] >= 12:
                            return p
                    return None

                proc = wait_for(followed, timeout=120, what="the host's Go process in `ps`")
                agent_ready = time.monotonic() - t1
    assert proc["node"] == f"image-{tag}" and proc["go_version"] == "go1.22.10"
    assert proc["tracking"] == "probes", proc["tracking_reason"]
    assert proc["exe"].endswith("/populations")
    print(
        f"start-up: control plane answers {cp_ready:.1f} s after `podman run`; the agent "
        f"reports the host process {agent_ready:.1f} s after `podman run`"
    )
