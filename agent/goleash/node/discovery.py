"""Finding the Go processes of a host, and which of them to follow.

A scan lists /proc (the host's: the agent runs with hostPID) and, for each process,
stats its executable through /proc/PID/exe. Whether that executable is a Go program
is decided once per file version, (device, inode, size, mtime), by looking for Go's
build info: so a scan of a steady host costs one stat per process and no reads.
Kernel threads (no executable) are remembered by PID until they vanish. A process
that exec()s another program keeps its PID but changes executable: it is judged
again, which also catches `fork; exec ./server` seen between the two calls.

Selection (every criterion given must hold; within one criterion any value will do):
PIDs, executable globs (matched against the path in the process's own mount
namespace and its base name), cgroup path globs (containers), Kubernetes pod UIDs
(parsed from kubepods cgroup paths). With no criterion every Go process is followed
except the agent itself and processes it started.

Kubernetes placement comes from the node, never from the API server: the pod UID
and container id from /proc/PID/cgroup; pod name, namespace and container name from
the container runtime's bundle (containerd, CRI-O) under the host root; labels from
a downward-API volume the pod mounts, when it has one; the namespace also from the
service-account mount inside the container; POD_NAME/POD_NAMESPACE from the
process's environment when the pod's spec sets them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import select
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from goleash.gobin.binary import GoBinary
from goleash.gobin.buildinfo import read_build_info
from goleash.gobin.errors import BinaryError, DamagedBinaryError

# --- Kubernetes placement ---------------------------------------------------------

# cgroupfs driver: .../kubepods/burstable/pod1b2c.../<container id>
# systemd driver:  .../kubepods-burstable-pod1b2c..._....slice/cri-containerd-<id>.scope
_POD_UID = re.compile(
    r"kubepods[^/]*/(?:[^/]*/)*?[^/]*pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
    r"[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")
# Pod-name suffixes Kubernetes controllers generate: ReplicaSet hash and pod
# suffix use the alphabet of k8s.io/apimachinery's rand.SafeEncodeString.
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_DEPLOYMENT_POD = re.compile(rf"^(.+)-[{_SAFE}]{{6,10}}-[{_SAFE}]{{5}}$")
_SUFFIXED_POD = re.compile(rf"^(.+)-[{_SAFE}]{{5}}$")
_STATEFUL_POD = re.compile(r"^(.+)-\d+$")


@dataclass(frozen=True)
class KubePlacement:
    """Where a process sits in Kubernetes; empty strings where unknown."""

    pod_uid: str
    container_id: str = ""
    namespace: str = ""
    pod: str = ""
    container: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    workload_kind: str = ""
    workload_name: str = ""

    @property
    def service(self) -> str:
        """ "namespace/workload" (the API's service name), or "" when not known."""
        name = self.workload_name or self.pod
        if not name:
            return ""
        return f"{self.namespace}/{name}" if self.namespace else name


def pod_uid_from_cgroup(text: str) -> str:
    """The pod UID in a /proc/PID/cgroup text (dashes restored), "" if not a pod."""
    for line in text.splitlines():
        m = _POD_UID.search(line.rpartition(":")[2])
        if m:
            return m.group(1).replace("_", "-")
    return ""


def container_id_from_cgroup(text: str) -> str:
    """The 64-hex container id ending a cgroup path (docker-, cri-containerd-, crio-
    scopes or a bare id), "" if none."""
    for line in text.splitlines():
        path = line.rpartition(":")[2].rstrip("/")
        m = _CONTAINER_ID.search(path)
        if m:
            return m.group(1)
    return ""


def workload_from_pod(pod: str, labels: dict[str, str]) -> tuple[str, str]:
    """(kind, name) of the workload that owns a pod, from its labels (exact) or the
    shape of its name (a guess the kind says nothing about: kind "")."""
    h = labels.get("pod-template-hash")
    if h and f"-{h}-" in pod:
        return "Deployment", pod.rsplit(f"-{h}-", 1)[0]
    if "statefulset.kubernetes.io/pod-name" in labels and _STATEFUL_POD.match(pod):
        return "StatefulSet", pod.rsplit("-", 1)[0]
    if labels.get("controller-revision-hash") and _SUFFIXED_POD.match(pod):
        return "DaemonSet", pod.rsplit("-", 1)[0]
    if "job-name" in labels:
        return "Job", labels["job-name"]
    for rx in (_DEPLOYMENT_POD, _SUFFIXED_POD):
        m = rx.match(pod)
        if m:
            return "", m.group(1)
    return "", pod


def parse_labels_file(text: str) -> dict[str, str]:
    """A downward-API labels file: one `key="value"` a line (value Go-quoted)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            try:
                out[key] = json.loads(value) if value.startswith('"') else value
            except ValueError:
                out[key] = value.strip('"')
    return out


def read_environ(pid: int, proc_root: str = "/proc") -> dict[str, str]:
    try:
        raw = Path(f"{proc_root}/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def _read_text(path: Path | str, errors: str = "strict") -> str:
    """A small /proc or config file's text, "" when it cannot be read. os.read, not
    Path.read_text: a scan reads a few files per process every second, and the
    text-file layers cost four times the read itself (measured 185 vs 45 us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if len(chunks) > 64:  # 4 MB: no file read here is nearly that large
                break
        return b"".join(chunks).decode(errors=errors)
    except (OSError, UnicodeDecodeError):
        return ""
    finally:
        os.close(fd)


def _runtime_annotations(host_root: Path, container_id: str) -> dict[str, str]:
    """The CRI annotations of a container from its runtime bundle's config.json."""
    for rel in (
        f"run/containerd/io.containerd.runtime.v2.task/k8s.io/{container_id}/config.json",
        f"run/containers/storage/overlay-containers/{container_id}/userdata/config.json",
    ):
        text = _read_text(host_root / rel)
        if text:
            try:
                ann = json.loads(text).get("annotations") or {}
            except ValueError:
                continue
            return {str(k): str(v) for k, v in ann.items()}
    return {}


def kube_placement(
    pid: int, cgroup_text: str, host_root: Path, proc_root: str = "/proc"
) -> KubePlacement | None:
    """Kubernetes placement of a process, or None if it is not in a pod."""
    uid = pod_uid_from_cgroup(cgroup_text)
    if not uid:
        return None
    cid = container_id_from_cgroup(cgroup_text)
    ann = _runtime_annotations(host_root, cid) if cid else {}
    env = read_environ(pid, proc_root)
    namespace = (
        ann.get("io.kubernetes.cri.sandbox-namespace")
        or ann.get("io.kubernetes.pod.namespace")
        or env.get("POD_NAMESPACE")
        or _read_text(
            Path(f"{proc_root}/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        ).strip()
    )
    pod = (
        ann.get("io.kubernetes.cri.sandbox-name")
        or ann.get("io.kubernetes.pod.name")
        or env.get("POD_NAME")
        or ""
    )
    container = (
        ann.get("io.kubernetes.cri.container-name") or ann.get("io.kubernetes.container.name") or ""
    )
    labels: dict[str, str] = {}
    volumes = host_root / "var/lib/kubelet/pods" / uid / "volumes/kubernetes.io~downward-api"
    try:
        for vol in sorted(volumes.iterdir()):
            labels.update(parse_labels_file(_read_text(vol / "labels")))
    except OSError:
        pass
    kind, workload = workload_from_pod(pod, labels) if pod else ("", "")
    name = labels.get("app.kubernetes.io/name") or labels.get("app") or workload
    return KubePlacement(
        pod_uid=uid,
        container_id=cid,
        namespace=namespace,
        pod=pod,
        container=container,
        labels=labels,
        workload_kind=kind,
        workload_name=name,
    )


# --- selection ---------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """Which Go processes to follow; empty: all of them."""

    pids: frozenset[int] = frozenset()
    exe_globs: tuple[str, ...] = ()
    cgroup_globs: tuple[str, ...] = ()
    pod_uids: frozenset[str] = frozenset()

    @property
    def everything(self) -> bool:
        return not (self.pids or self.exe_globs or self.cgroup_globs or self.pod_uids)

    def matches(self, c: Candidate) -> bool:
        return self.matches_cheap(c.pid, c.exe, c.cgroups, c.kube.pod_uid if c.kube else "")

    def matches_cheap(self, pid: int, exe: str, cgroups: Iterable[str], pod_uid: str) -> bool:
        """Every criterion on what /proc tells without reading the executable: applied
        before any ELF is read, so a selective agent never parses other programs."""
        if self.pids and pid not in self.pids:
            return False
        if self.exe_globs and not any(
            fnmatch.fnmatchcase(exe, g) or fnmatch.fnmatchcase(os.path.basename(exe), g)
            for g in self.exe_globs
        ):
            return False
        if self.cgroup_globs and not any(
            fnmatch.fnmatchcase(path, g) for path in cgroups for g in self.cgroup_globs
        ):
            return False
        return (
            not self.pod_uids
            or pod_uid in self.pod_uids
            or pod_uid.replace("-", "_") in self.pod_uids
        )


# --- processes ---------------------------------------------------------------------


JUDGE_ATTEMPTS = 3  # unexpected failures judging one process before it is left alone
MAX_VERDICTS = 4096  # file versions remembered; a busy host's binaries, with room


@dataclass(frozen=True)
class GoCheck:
    """What one executable file is, decided once per file version."""

    go_version: str | None  # None: not a Go program
    main_module: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A Go process on the host."""

    pid: int
    start_ticks: int  # /proc/PID/stat starttime: with pid, the process's identity
    exe: str  # path in the process's own mount namespace
    exe_key: tuple[int, int, int, int]  # (dev, inode, size, mtime_ns) of the executable
    go_version: str
    main_module: str | None
    cgroups: tuple[str, ...]
    kube: KubePlacement | None

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)

    @property
    def container_id(self) -> str:
        if self.kube is not None:
            return self.kube.container_id
        return container_id_from_cgroup("\n".join(self.cgroups))


@dataclass
class ScanResult:
    appeared: list[Candidate]
    vanished: list[tuple[int, int]]  # keys of followed candidates that are gone


def _stat_fields(pid: int, proc_root: str) -> tuple[int, int] | None:
    """(ppid, starttime) from /proc/PID/stat."""
    # the command name in it is any bytes a process chose: only what follows counts
    text = _read_text(f"{proc_root}/{pid}/stat", errors="replace")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


class Discovery:
    """Keeps the set of selected Go processes of the host up to date, scan by scan."""

    def __init__(
        self,
        selector: Selector,
        *,
        host_root: str | os.PathLike[str] = "/",
        proc_root: str = "/proc",
        self_pid: int | None = None,
        on_error: Callable[[int, str, BaseException, tuple[int, int]], None] | None = None,
    ) -> None:
        """on_error(pid, exe, exception, (pid, start)) hears of a process that could
        not be judged (the scan goes on with the others)."""
        self.selector = selector
        self.host_root = Path(host_root)
        self.proc_root = proc_root
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self._verdicts: dict[tuple[int, int, int, int], GoCheck] = {}
        self._no_exe: set[int] = set()  # kernel threads (and zombies until reaped)
        self._seen: dict[int, tuple[int, int, int, int]] = {}  # pid -> exe key judged
        self.followed: dict[int, Candidate] = {}  # pid -> selected candidate
        self.on_error = on_error
        self._judge_failures: dict[int, int] = {}  # pid -> unexpected failures judging it
        self.scans = 0
        # A pidfd per followed process (the host's /proc only): its exit is one poll
        # for all of them instead of a read of /proc/PID/stat each, every scan.
        self._pidfds: dict[int, int] = {}  # pid -> pidfd
        self._poll = select.poll()

    # --- one process -------------------------------------------------------------

    def _exe_key(self, pid: int) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(f"{self.proc_root}/{pid}/exe")
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _check(
        self, pid: int, key: tuple[int, int, int, int]
    ) -> tuple[GoCheck, tuple[int, int, int, int]]:
        """The verdict on PID's executable and the key of the file it is about.

        `key` (from a stat) only finds a verdict already made. A new one is made from
        one open file: its key comes from fstat on that descriptor and every byte
        parsed from it, so an exec between two reads cannot mix two executables."""
        found = self._verdicts.get(key)
        if found is not None:
            return found, key
        try:
            binary = GoBinary(f"{self.proc_root}/{pid}/exe")
        except DamagedBinaryError as exc:
            # The kernel runs files goleash refuses (a section table past the end):
            # counted once per file version, never parsed again.
            self._report("judge", pid, exc)
            self._remember(key, GoCheck(None))
            return GoCheck(None), key
        except BinaryError:
            return GoCheck(None), key  # gone, or not a regular ELF file: judged again later
        try:
            key = binary.key
            found = self._verdicts.get(key)
            if found is None:
                try:
                    info = read_build_info(binary)
                    found = GoCheck(info.go_version, info.main_module)
                except BinaryError as exc:
                    found = GoCheck(None)
                    if isinstance(exc, DamagedBinaryError):
                        self._report("judge", pid, exc)  # once per file version
                self._remember(key, found)
        finally:
            binary.close()
        return found, key

    def _descends_from_self(self, pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == self.self_pid:
                return True
            f = _stat_fields(pid, self.proc_root)
            if f is None:
                return False
            pid, seen = f[0], seen + 1
        return False

    def candidate(self, pid: int) -> Candidate | None:
        """The Go process PID as a candidate, or None (not Go, not selected, gone,
        kernel thread). The selector's cheap criteria come first: no ELF is read for
        a process they rule out."""
        stat_key = self._exe_key(pid)
        if stat_key is None:
            return None
        st = _stat_fields(pid, self.proc_root)
        if st is None:
            return None
        try:
            exe = os.readlink(f"{self.proc_root}/{pid}/exe").removesuffix(" (deleted)")
        except OSError:
            return None
        cgroup_text = _read_text(Path(f"{self.proc_root}/{pid}/cgroup"))
        cgroups = tuple(
            line.split(":", 2)[2] for line in cgroup_text.splitlines() if line.count(":") >= 2
        )
        if not self.selector.matches_cheap(pid, exe, cgroups, pod_uid_from_cgroup(cgroup_text)):
            return None
        check, key = self._check(pid, stat_key)
        if check.go_version is None:
            return None
        st_after = _stat_fields(pid, self.proc_root)
        if st_after is None or st_after[1] != st[1]:
            return None  # exited (or the PID was reused) while judged
        return Candidate(
            pid=pid,
            start_ticks=st[1],
            exe=exe,
            exe_key=key,
            go_version=check.go_version,
            main_module=check.main_module,
            cgroups=cgroups,
            kube=kube_placement(pid, cgroup_text, self.host_root, self.proc_root),
        )

    # --- the host ------------------------------------------------------------------

    def _pids(self) -> Iterable[int]:
        try:
            names = os.listdir(self.proc_root)
        except OSError:
            return []
        return [int(n) for n in names if n.isdigit()]

    def scan(self, *, check_exec: bool = True) -> ScanResult:
        """Compare the host with the previous scan: selected Go processes that
        appeared, and followed ones that vanished (exited, or exec'd another program).

        check_exec=False leaves out the stat of each followed process's executable
        (an exec keeps the PID): the agent asks for it before every snapshot, so no
        snapshot reads an exec'd process, and skips it on the scans in between, which
        only look for new processes and exits (a stat of /proc/PID/exe was a fifth
        of an idle agent's CPU at one scan a second)."""
        self.scans += 1
        pids = set(self._pids())
        self._no_exe &= pids
        for pid in [p for p in self._seen if p not in pids]:
            del self._seen[pid]
        for pid in [p for p in self._judge_failures if p not in pids]:
            del self._judge_failures[pid]
        vanished: list[tuple[int, int]] = []
        exited = self._exited()
        for pid, c in list(self.followed.items()):
            if pid in self._pidfds:  # the very process: no start time to compare
                gone = pid in exited or pid not in pids
            else:
                st = _stat_fields(pid, self.proc_root) if pid in pids else None
                gone = st is None or st[1] != c.start_ticks
            if gone or (check_exec and self._exe_key(pid) != c.exe_key):
                vanished.append(c.key)
                del self.followed[pid]
                self._unwatch(pid)
                self._seen.pop(pid, None)
        appeared: list[Candidate] = []
        chosen = self.selector.pids
        for pid in sorted(pids & chosen if chosen else pids):
            if pid == self.self_pid or pid in self._no_exe or pid in self.followed:
                continue
            key = self._exe_key(pid)
            if key is None:
                if not Path(f"{self.proc_root}/{pid}").exists():
                    continue
                self._no_exe.add(pid)
                continue
            if self._seen.get(pid) == key:
                continue  # judged already, nothing changed
            self._seen[pid] = key
            try:
                found = self.candidate(pid)
            except Exception as exc:  # hostile or racing input: this process only
                self._judge_failed(pid, exc)
                continue
            if found is None or not self.selector.matches(found):
                continue
            if self.selector.everything and self._descends_from_self(pid):
                continue
            if not self._watch(found):
                continue  # exited (its PID maybe reused) since it was judged
            self.followed[pid] = found
            appeared.append(found)
        return ScanResult(appeared, vanished)

    # --- exits -------------------------------------------------------------------

    def _watch(self, c: Candidate) -> bool:
        """Open a pidfd for C (when the kernel has them and this is the host's /proc);
        False when the PID no longer is C's process. Without a pidfd (old kernel, no
        descriptor left) C is watched through /proc/PID/stat, as before."""
        if self.proc_root != "/proc" or not hasattr(os, "pidfd_open"):
            return True
        try:
            fd = os.pidfd_open(c.pid)
        except OSError:
            return _stat_fields(c.pid, self.proc_root) is not None
        st = _stat_fields(c.pid, self.proc_root)
        if st is None or st[1] != c.start_ticks:  # the pidfd is of another process
            os.close(fd)
            return False
        self._pidfds[c.pid] = fd
        self._poll.register(fd, select.POLLIN)
        return True

    def _unwatch(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(fd)
            os.close(fd)

    def _exited(self) -> set[int]:
        """Followed PIDs whose process has exited (its pidfd is readable)."""
        if not self._pidfds:
            return set()
        by_fd = {fd: pid for pid, fd in self._pidfds.items()}
        return {by_fd[fd] for fd, _ev in self._poll.poll(0) if fd in by_fd}

    def close(self) -> None:
        """Close the pidfds (the agent stops)."""
        for pid in list(self._pidfds):
            self._unwatch(pid)

    def _remember(self, key: tuple[int, int, int, int], verdict: GoCheck) -> None:
        if len(self._verdicts) >= MAX_VERDICTS:
            self._verdicts.pop(next(iter(self._verdicts)))  # oldest first
        self._verdicts[key] = verdict

    def _report(self, stage: str, pid: int, exc: BaseException) -> None:
        if self.on_error is None:
            return
        try:
            exe = os.readlink(f"{self.proc_root}/{pid}/exe")
        except OSError:
            exe = "?"
        st = _stat_fields(pid, self.proc_root)
        self.on_error(pid, exe, exc, (pid, st[1] if st else 0))

    def _judge_failed(self, pid: int, exc: BaseException) -> None:
        """Judged again at the next scans, up to JUDGE_ATTEMPTS times; then not until
        its executable changes (_seen keeps the version that failed)."""
        n = self._judge_failures[pid] = self._judge_failures.get(pid, 0) + 1
        if n < JUDGE_ATTEMPTS:
            self._seen.pop(pid, None)
        self._report("judge", pid, exc)

    def forget(self, pid: int, *, retry: bool = False) -> None:
        """Stop following PID. With retry, the next scan judges it afresh (a transient
        failure); without, not until its executable changes (it cannot be traced)."""
        self.followed.pop(pid, None)
        self._unwatch(pid)
        if retry:
            self._seen.pop(pid, None)
