"""The node agent's plain-data parts: discovery on a fake /proc (real Go binaries
behind its exe links), Kubernetes placement from cgroup paths and runtime bundles,
selection, the batch buffer, and Prometheus buckets. No root, no BPF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import gobuild
from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.node.discovery import (
    Candidate,
    Discovery,
    KubePlacement,
    Selector,
    container_id_from_cgroup,
    kube_placement,
    parse_labels_file,
    pod_uid_from_cgroup,
    workload_from_pod,
)
from goleash.node.metrics import LATENCY_BOUNDS_NS, cumulative_buckets
from goleash.node.sender import BUFFER_FULL, BatchBuffer
from goleash.probes import hist

UID = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
CID = "ab" * 32
SYSTEMD = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
)
CGROUPFS = (
    f"12:memory:/kubepods/besteffort/pod{UID}/{CID}\n11:cpu:/kubepods/besteffort/pod{UID}/{CID}\n"
)


# --- Kubernetes placement ---------------------------------------------------------


@pytest.mark.parametrize("text", [SYSTEMD, CGROUPFS, f"0::/kubepods/pod{UID}/{CID}\n"])
def test_pod_uid_and_container_id_from_cgroup_paths(text: str) -> None:
    assert pod_uid_from_cgroup(text) == UID
    assert container_id_from_cgroup(text) == CID


@pytest.mark.parametrize(
    "text",
    [
        "0::/user.slice/user-0.slice/session-3.scope\n",
        f"0::/system.slice/docker-{CID}.scope\n",
        "0::/\n",
    ],
)
def test_not_a_pod(text: str) -> None:
    assert pod_uid_from_cgroup(text) == ""


def test_container_ids_of_runtimes() -> None:
    for path in (f"docker-{CID}.scope", f"crio-{CID}.scope", f"cri-containerd-{CID}.scope", CID):
        assert container_id_from_cgroup(f"0::/x/{path}\n") == CID
    assert container_id_from_cgroup("0::/user.slice/session-3.scope\n") == ""


@pytest.mark.parametrize(
    "pod,labels,want",
    [
        ("shop-7d9c6b5f4-x2k8q", {"pod-template-hash": "7d9c6b5f4"}, ("Deployment", "shop")),
        ("db-2", {"statefulset.kubernetes.io/pod-name": "db-2"}, ("StatefulSet", "db")),
        ("node-agent-x2k8q", {"controller-revision-hash": "5c7d"}, ("DaemonSet", "node-agent")),
        ("migrate-x2k8q", {"job-name": "migrate"}, ("Job", "migrate")),
        ("shop-api-7d9c6b5f4-x2k8q", {}, ("", "shop-api")),  # a guess from the name alone
        ("standalone", {}, ("", "standalone")),
    ],
)
def test_workload_from_pod(pod: str, labels: dict[str, str], want: tuple[str, str]) -> None:
    assert workload_from_pod(pod, labels) == want


def test_labels_file() -> None:
    text = 'app="shop"\napp.kubernetes.io/name="shop-api"\nnote="a \\"quoted\\" value"\n'
    assert parse_labels_file(text) == {
        "app": "shop",
        "app.kubernetes.io/name": "shop-api",
        "note": 'a "quoted" value',
    }


def _fake_node(root: Path, labels: str | None) -> None:
    bundle = root / "host/run/containerd/io.containerd.runtime.v2.task/k8s.io" / CID
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(
        json.dumps(
            {
                "annotations": {
                    "io.kubernetes.cri.sandbox-name": "shop-7d9c6b5f4-x2k8q",
                    "io.kubernetes.cri.sandbox-namespace": "prod",
                    "io.kubernetes.cri.sandbox-uid": UID,
                    "io.kubernetes.cri.container-name": "server",
                }
            }
        )
    )
    if labels is not None:
        vol = root / f"host/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~downward-api/podinfo"
        vol.mkdir(parents=True)
        (vol / "labels").write_text(labels)
    (root / "proc/42").mkdir(parents=True)
    (root / "proc/42/environ").write_bytes(b"PATH=/bin\0HOSTNAME=shop-7d9c6b5f4-x2k8q\0")


def test_kube_placement_from_the_runtime_bundle_and_downward_api(tmp_path: Path) -> None:
    _fake_node(tmp_path, 'pod-template-hash="7d9c6b5f4"\napp.kubernetes.io/name="shop"\n')
    k = kube_placement(42, SYSTEMD, tmp_path / "host", str(tmp_path / "proc"))
    assert k is not None
    assert (k.pod_uid, k.container_id, k.namespace, k.pod, k.container) == (
        UID,
        CID,
        "prod",
        "shop-7d9c6b5f4-x2k8q",
        "server",
    )
    assert (k.workload_kind, k.workload_name, k.service) == ("Deployment", "shop", "prod/shop")


def test_kube_placement_without_labels_uses_the_pod_name(tmp_path: Path) -> None:
    _fake_node(tmp_path, None)
    k = kube_placement(42, SYSTEMD, tmp_path / "host", str(tmp_path / "proc"))
    assert k is not None and k.service == "prod/shop" and k.workload_kind == ""
    # nothing known but the UID: no service name, the agent falls back to the exe name
    assert KubePlacement(pod_uid=UID).service == ""


def test_kube_placement_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "proc/42").mkdir(parents=True)
    (tmp_path / "proc/42/environ").write_bytes(b"POD_NAME=cart-0\0POD_NAMESPACE=shop\0")
    k = kube_placement(42, CGROUPFS, tmp_path, str(tmp_path / "proc"))
    # "-0" could be a StatefulSet ordinal or part of the name: without labels, kept
    assert k is not None and (k.namespace, k.pod, k.service) == ("shop", "cart-0", "shop/cart-0")
    assert kube_placement(42, "0::/user.slice\n", tmp_path, str(tmp_path / "proc")) is None


# --- selection -------------------------------------------------------------------------


def _cand(pid: int, exe: str, cgroup: str = "0::/user.slice", uid: str = "") -> Candidate:
    return Candidate(
        pid=pid,
        start_ticks=1,
        exe=exe,
        exe_key=(0, pid, 0, 0),
        go_version="go1.22.10",
        main_module=None,
        cgroups=(cgroup.split(":", 2)[2],),
        kube=KubePlacement(pod_uid=uid) if uid else None,
    )


def test_selector_every_criterion_must_hold() -> None:
    shop = _cand(10, "/srv/shop-api", f"0::/kubepods/pod{UID}/{CID}", UID)
    cart = _cand(11, "/srv/cart")
    assert Selector().everything and Selector().matches(shop) and Selector().matches(cart)
    assert Selector(pids=frozenset({10, 12})).matches(shop)
    assert not Selector(pids=frozenset({10})).matches(cart)
    assert Selector(exe_globs=("shop-*",)).matches(shop)  # the base name
    assert Selector(exe_globs=("/srv/*",)).matches(cart)  # the full path
    assert Selector(cgroup_globs=("*kubepods*",)).matches(shop)
    assert not Selector(cgroup_globs=("*kubepods*",)).matches(cart)
    assert Selector(pod_uids=frozenset({UID})).matches(shop)
    assert Selector(pod_uids=frozenset({UID.replace("-", "_")})).matches(shop)
    assert not Selector(pod_uids=frozenset({UID})).matches(cart)
    both = Selector(exe_globs=("*shop*", "*cart*"), pod_uids=frozenset({UID}))
    assert both.matches(shop) and not both.matches(cart)


# --- discovery on a fake /proc ------------------------------------------------------------


def _stat(pid: int, ppid: int, start: int) -> str:
    # fields after the command: state, ppid, 17 more, then starttime (field 22)
    return f"{pid} (x y) S {ppid} " + " ".join(["0"] * 17) + f" {start} 0 0\n"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()

    def add(
        self, pid: int, exe: str | None, *, ppid: int = 1, start: int = 100, cgroup: str = ""
    ) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(_stat(pid, ppid, start))
        (d / "cgroup").write_text(cgroup or "0::/user.slice/session-1.scope\n")
        link = d / "exe"
        if link.is_symlink():
            link.unlink()
        if exe is not None:
            link.symlink_to(exe)

    def remove(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.fixture(scope="module")
def go_binary() -> str:
    return str(gobuild.build("populations", "1.22.10"))


def test_discovery_follows_go_processes_as_they_come_and_go(tmp_path: Path, go_binary: str) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(1, "/bin/sh")
    proc.add(2, None)  # a kernel thread: no executable
    proc.add(100, go_binary, start=500)
    proc.add(101, "/bin/sh", start=501)  # forked, not yet exec'd
    d = Discovery(Selector(), proc_root=str(proc.root), host_root=tmp_path, self_pid=99999)
    r = d.scan()
    assert [c.pid for c in r.appeared] == [100] and r.vanished == []
    c = r.appeared[0]
    assert (c.exe, c.go_version, c.start_ticks) == (go_binary, "go1.22.10", 500)
    assert os.path.basename(c.exe) == "populations" and c.kube is None

    assert d.scan().appeared == []  # nothing changed: nothing judged again
    proc.add(101, go_binary, start=501)  # exec'd the Go program
    assert [c.pid for c in d.scan().appeared] == [101]
    proc.remove(100)  # exited
    r = d.scan()
    assert r.appeared == [] and r.vanished == [(100, 500)]
    proc.add(100, go_binary, start=900)  # the PID reused by a new process
    r = d.scan()
    assert [(c.pid, c.start_ticks) for c in r.appeared] == [(100, 900)]
    proc.add(101, "/bin/sh", start=501)  # exec'd something else: no longer Go
    assert d.scan().vanished == [(101, 501)]
    assert set(d.followed) == {100}
    # each executable version was judged once, however many scans saw it
    assert len(d._verdicts) == 2


def test_discovery_never_follows_itself_or_its_children_unless_asked(
    tmp_path: Path, go_binary: str
) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(50, go_binary, ppid=1)  # "the agent" (pretend it is Go, the worst case)
    proc.add(51, go_binary, ppid=50)  # its child
    proc.add(52, go_binary, ppid=51)  # its grandchild
    proc.add(60, go_binary, ppid=1)
    everything = Discovery(Selector(), proc_root=str(proc.root), self_pid=50)
    assert [c.pid for c in everything.scan().appeared] == [60]
    asked = Discovery(Selector(pids=frozenset({50, 52})), proc_root=str(proc.root), self_pid=50)
    assert [c.pid for c in asked.scan().appeared] == [52]


def test_discovery_with_pids_never_looks_at_other_processes(tmp_path: Path, go_binary: str) -> None:
    # `--pid` on a busy node: the other processes cost no stat and no judgement.
    proc = FakeProc(tmp_path / "proc")
    proc.add(40, go_binary)
    proc.add(41, go_binary)
    d = Discovery(Selector(pids=frozenset({41, 77})), proc_root=str(proc.root), self_pid=1)
    assert [c.pid for c in d.scan().appeared] == [41]
    assert set(d._seen) == {41}
    proc.add(77, go_binary, start=300)  # an asked-for PID that appears later
    assert [c.pid for c in d.scan().appeared] == [77]


def test_discovery_reads_proc_files_that_are_odd(tmp_path: Path, go_binary: str) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(90, go_binary)
    (proc.root / "90" / "cgroup").unlink()
    (proc.root / "90" / "cgroup").mkdir()  # unreadable as a file: no cgroups, no crash
    proc.add(91, go_binary)
    (proc.root / "91" / "stat").write_bytes(b"91 (\xff\xfe) S 1 " + b"0 " * 17 + b"5 0 0\n")
    d = Discovery(Selector(), proc_root=str(proc.root), self_pid=1)
    got = {c.pid: c for c in d.scan().appeared}
    assert set(got) == {90, 91} and got[90].cgroups == ()
    assert got[91].start_ticks == 5  # a command name that is not UTF-8 is no obstacle


def test_an_exec_is_seen_by_the_scans_that_check_for_it(tmp_path: Path, go_binary: str) -> None:
    # The agent checks executables on the scan before each snapshot only.
    proc = FakeProc(tmp_path / "proc")
    proc.add(60, go_binary, start=7)
    d = Discovery(Selector(), proc_root=str(proc.root), self_pid=1)
    assert [c.pid for c in d.scan().appeared] == [60]
    proc.add(60, "/bin/sh", start=7)  # exec'd another program: same PID, same start
    assert d.scan(check_exec=False).vanished == []
    assert d.scan(check_exec=True).vanished == [(60, 7)]


def test_discovery_selects_by_pod(tmp_path: Path, go_binary: str) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(70, go_binary, cgroup=SYSTEMD)
    proc.add(71, go_binary)
    d = Discovery(Selector(pod_uids=frozenset({UID})), proc_root=str(proc.root), host_root=tmp_path)
    (c,) = d.scan().appeared
    assert c.pid == 70 and c.kube is not None and c.kube.pod_uid == UID
    assert c.container_id == CID


def test_forget_and_retry(tmp_path: Path, go_binary: str) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add(80, go_binary)
    d = Discovery(Selector(), proc_root=str(proc.root))
    assert len(d.scan().appeared) == 1
    d.forget(80)  # cannot be traced: not judged again
    assert d.scan().appeared == []
    d.forget(80, retry=True)  # a transient failure: judged at the next scan
    assert len(d.scan().appeared) == 1


# --- the batch buffer ------------------------------------------------------------------------


def _batch(seq: int) -> ing.AgentBatch:
    return ing.AgentBatch(agent=t.AgentIdentity(agent_id="a"), sequence=seq)


def _send(buf: BatchBuffer) -> ing.AgentBatch | None:
    e = buf.next_unsent(0, keep_sent_s=60)
    if e is None:
        return None
    buf.mark_sent(e)
    return e


def test_buffer_drops_the_oldest_never_sent_and_counts_them() -> None:
    buf = BatchBuffer(max_batches=3)
    for seq in range(1, 6):
        buf.put(_batch(seq), [])
    assert buf.drops[BUFFER_FULL] == 2
    first = _send(buf)
    assert first is not None and first.batch.sequence == 3
    assert first.drops == {BUFFER_FULL: 2}  # reported with the next batch that goes out
    second = _send(buf)
    assert second is not None and second.drops == {}  # reported once


def test_buffer_resends_what_went_out_just_before_a_failure() -> None:
    buf = BatchBuffer(max_batches=10)
    for seq in (1, 2, 3):
        buf.put(_batch(seq), [])
    assert [_send(buf).batch.sequence for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]
    assert _send(buf) is None
    assert buf.rewind(since=0.0) == 3
    assert [_send(buf).batch.sequence for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]
    # evicting a batch that was sent once is no loss to count
    for seq in range(4, 15):
        buf.put(_batch(seq), [])
    assert buf.drops[BUFFER_FULL] == 1  # 4 only: 1..3 had gone out
    assert buf.rewind(since=0.0, give_up=True) == 0


def test_buffer_bounded_by_bytes() -> None:
    buf = BatchBuffer(max_batches=100, max_bytes=1)
    buf.put(_batch(1), [])
    buf.put(_batch(2), [])
    assert len(buf) == 1 and buf.drops[BUFFER_FULL] == 1


# --- Prometheus buckets ------------------------------------------------------------------------


def test_latency_buckets_are_exact_at_octave_bounds() -> None:
    values = [1, 999, 1024, 1025, 5_000, 4096, 70_000, 2**20, 3 * 10**9, 10**12]
    h = hist.Histogram.of(values)
    got = cumulative_buckets(h.counts)
    assert got[-1] == ("+Inf", float(len(values)))
    for (le, n), bound in zip(got, LATENCY_BOUNDS_NS, strict=False):
        assert float(le) == bound / 1e9
        assert n == sum(1 for v in values if v < bound), le


# --- the DaemonSet's command line ----------------------------------------------------------


def test_the_daemonset_args_are_the_agents_flags() -> None:
    import re

    import yaml

    from goleash.cli import build_parser

    path = Path(__file__).resolve().parents[2] / "deploy/kubernetes/agent.yaml"
    ds = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    env = {"NODE_NAME": "node-1", "GOLEASH_SERVER": "cp.goleash:7070", "GOLEASH_INTERVAL": "5"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    ns = build_parser().parse_args(args)
    assert ns.command == "agent"
    assert (ns.server, ns.node_name, ns.host_root, ns.interval) == (
        "cp.goleash:7070",
        "node-1",
        "/host",
        5.0,
    )
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ns.health_listen.endswith(f":{ports['health']}")
    assert ns.metrics_listen.endswith(f":{ports['metrics']}")
