"""deploy/: the image and the Kubernetes manifests, checked without a cluster or Docker.

Every manifest is validated (strictly: unknown fields fail) against the Kubernetes
schemas bundled in PyPI's kubernetes-validate, for the newest version it knows and for
the oldest one goleash supports. The kustomizations are rendered by a small reader of
the subset of kustomize they use (resources, configMapGenerator, patches), which
refuses any field it does not know; where `kubectl` exists, its own rendering is
compared too. Then the properties a reviewer of a privileged DaemonSet would check are
asserted, and every command the image and the manifests run is checked against the
real `goleash` CLI of this venv (the Dockerfile installs it the way `make setup` does).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "kubernetes"
TLS_OVERLAY = DEPLOY / "overlays" / "tls"
OPT_IN = [BASE / "servicemonitor.yaml"]  # needs the Prometheus Operator's CRDs

# gRPC probes are GA from 1.27; the newest is what kubernetes-validate bundles.
K8S_VERSIONS = ["1.27.0", kv.latest_version()]
NO_CORE_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
}

HOST_MOUNTS = [
    "/lib/modules",
    "/usr/src",
    "/sys/kernel/debug",
    "/sys/kernel/tracing",
    "/sys/fs/bpf",
]
DEGRADE_RESOURCES = {"deployments", "statefulsets", "daemonsets"}
DEGRADE_VERBS = {"get", "patch", "list", "watch"}


# --- rendering -------------------------------------------------------------------


class KustomizeSubsetError(Exception):
    """The kustomization uses something this reader does not implement."""


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _env_file(path: Path) -> dict[str, str]:
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            data[key] = value
    return data


def _generate_configmap(root: Path, gen: dict[str, Any]) -> dict[str, Any]:
    unknown = set(gen) - {"name", "namespace", "envs", "files", "literals", "options"}
    if unknown:
        raise KustomizeSubsetError(f"configMapGenerator fields {unknown}")
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        data.update(_env_file(root / env))
    for f in gen.get("files", []):
        key, _, src = f.rpartition("=") if "=" in f else (Path(f).name, "", f)
        data[key] = (root / src).read_text()
    for lit in gen.get("literals", []):
        key, _, value = lit.partition("=")
        data[key] = value
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
    if "namespace" in gen:
        cm["metadata"]["namespace"] = gen["namespace"]
    if set(gen.get("options", {})) - {"disableNameSuffixHash"}:
        raise KustomizeSubsetError(f"configMapGenerator options {gen['options']}")
    # kustomize appends a content hash to the name and rewrites references to it; the
    # references in the manifests use the base name, which is what is checked here.
    hashed = not gen.get("options", {}).get("disableNameSuffixHash", False)
    cm["metadata"]["annotations"] = {"test/name-suffix-hash": str(hashed).lower()}
    return cm


def _json_patch_add(doc: dict[str, Any], op: dict[str, Any]) -> None:
    if op.get("op") != "add":
        raise KustomizeSubsetError(f"JSON patch op {op.get('op')!r}")
    *parents, last = op["path"].strip("/").split("/")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if last == "-":
        node.append(op["value"])
    elif isinstance(node, list):
        node.insert(int(last), op["value"])
    else:
        node[last] = op["value"]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge for what the patches here touch: lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all("name" in p for p in patch):
        out_list = list(base)
        for item in patch:
            idx = [i for i, b in enumerate(out_list) if b.get("name") == item["name"]]
            if idx:
                out_list[idx[0]] = _merge(out_list[idx[0]], item)
            else:
                out_list.append(item)
        return out_list
    return patch


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    meta = doc["metadata"]
    return all(
        {"kind": doc["kind"], "name": meta["name"], "namespace": meta.get("namespace")}.get(k) == v
        for k, v in target.items()
    )


def render(root: Path) -> list[dict[str, Any]]:
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "configMapGenerator", "images", "patches"}
    if set(kust) - known:
        raise KustomizeSubsetError(f"{root}: kustomization fields {set(kust) - known}")
    assert kust["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (root / res).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    docs += [_generate_configmap(root, g) for g in kust.get("configMapGenerator", [])]
    for image in kust.get("images", []):
        for _, spec in pod_specs(docs):
            for c in spec["containers"]:
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for patch in kust.get("patches", []):
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, list):  # JSON 6902, applied to `target`
            hits = [d for d in docs if _matches(d, patch["target"])]
            assert len(hits) == 1, f"patch target {patch['target']} matches {len(hits)}"
            for op in body:
                _json_patch_add(hits[0], op)
        else:  # strategic merge, matched by kind/name/namespace
            target = {
                "kind": body["kind"],
                "name": body["metadata"]["name"],
                "namespace": body["metadata"].get("namespace"),
            }
            idx = [i for i, d in enumerate(docs) if _matches(d, target)]
            assert len(idx) == 1, f"patch {target} matches {len(idx)} resources"
            docs[idx[0]] = _merge(docs[idx[0]], body)
    return docs


@cache
def _rendered(root: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render(root))


def rendered(root: Path = BASE) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(root)))


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]["spec"]


def all_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for root in (BASE, TLS_OVERLAY):
        for d in rendered(root):
            yield f"{root.relative_to(REPO)}:{d['kind']}/{d['metadata']['name']}", d
    for path in OPT_IN:
        for d in load_docs(path):
            yield f"{path.relative_to(REPO)}:{d['kind']}/{d['metadata']['name']}", d


# --- schema validation -------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    unvalidated = set()
    for where, doc in all_docs():
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            unvalidated.add((doc["apiVersion"], doc["kind"]))
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} invalid for Kubernetes {version}: {path}: {exc.message}")
    # Only CRD kinds may escape the schemas; they are checked structurally below.
    assert unvalidated <= NO_CORE_SCHEMA


def test_strict_validation_rejects_a_misspelled_field() -> None:
    ds = one(rendered(), "DaemonSet", "goleash-agent")
    spec = ds["spec"]["template"]["spec"]
    spec["hostPid"] = spec.pop("hostPID")
    with pytest.raises(kv.ValidationError, match="hostPid"):
        kv.validate(ds, kv.latest_version(), strict=True)


def test_every_manifest_file_is_in_the_kustomization_or_documented_opt_in() -> None:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = {BASE / r for r in kust["resources"]}
    for gen in kust["configMapGenerator"]:
        listed |= {BASE / f for f in gen.get("envs", []) + gen.get("files", [])}
    for path in listed:
        assert path.is_file(), f"kustomization.yaml lists {path.name}, which does not exist"
    on_disk = {p for p in BASE.iterdir() if p.is_file() and p.name != "kustomization.yaml"}
    assert on_disk - listed == set(OPT_IN), "a manifest is neither applied nor opt-in"


def test_kubectl_kustomize_renders_the_same_resources() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the Python rendering above is the check")
    for root in (BASE, TLS_OVERLAY):
        out = subprocess.run(
            [kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
        for d in theirs:
            if (d["apiVersion"], d["kind"]) not in NO_CORE_SCHEMA:
                kv.validate(d, kv.latest_version(), strict=True)

        def key(d: dict[str, Any]) -> tuple[str, str, str]:
            name = d["metadata"]["name"]
            if d["metadata"].get("annotations", {}).get("test/name-suffix-hash") == "true":
                name += "-<hash>"
            return d["kind"], d["metadata"].get("namespace", ""), name

        def unhash(d: dict[str, Any]) -> tuple[str, str, str]:
            name = re.sub(r"-[a-z0-9]{10}$", "-<hash>", d["metadata"]["name"])
            return d["kind"], d["metadata"].get("namespace", ""), name

        assert sorted(map(unhash, theirs)) == sorted(map(key, rendered(root)))
        ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered(root)}
        for d in theirs:
            if d["kind"] in ("DaemonSet", "Deployment"):
                mine = ours[(d["kind"], d["metadata"]["name"])]
                c_theirs = d["spec"]["template"]["spec"]["containers"][0]
                c_mine = mine["spec"]["template"]["spec"]["containers"][0]
                assert c_theirs["args"] == c_mine["args"]
                volumes = d["spec"]["template"]["spec"]["volumes"]
                mine_volumes = mine["spec"]["template"]["spec"]["volumes"]
                assert {v["name"]: v for v in volumes} == {v["name"]: v for v in mine_volumes}


# --- namespace and pod security ----------------------------------------------------


def test_namespace_allows_privileged_pods_and_every_resource_names_its_namespace() -> None:
    docs = rendered()
    ns = one(docs, "Namespace", "goleash")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for d in docs:
        if d["kind"] != "Namespace":
            # kubectl apply -f of a single file must land in the same place as -k.
            assert d["metadata"].get("namespace"), f"{d['kind']}/{d['metadata']['name']}"


def test_control_plane_pod_meets_the_restricted_level() -> None:
    _, spec = next((d, s) for d, s in pod_specs(rendered()) if d["kind"] == "Deployment")
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not spec.get("hostPID") and not spec.get("hostNetwork")
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged")
    assert not [v for v in spec["volumes"] if "hostPath" in v]


# --- the agent DaemonSet -----------------------------------------------------------


def agent() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    ds = one(rendered(), "DaemonSet", "goleash-agent")
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return ds, spec, container


def test_agent_is_privileged_with_host_pids_on_every_node() -> None:
    _, spec, c = agent()
    assert c["securityContext"]["privileged"] is True
    assert spec["hostPID"] is True
    # One toleration that matches every taint: no key, operator Exists, any effect.
    assert {"operator": "Exists"} in spec["tolerations"]
    res = c["resources"]
    assert set(res["requests"]) >= {"cpu", "memory"} and set(res["limits"]) >= {"cpu", "memory"}


def test_every_privilege_carries_a_comment_saying_why() -> None:
    lines = (BASE / "agent.yaml").read_text().splitlines()
    for key in ("privileged: true", "hostPID: true", "tolerations:", "mountPropagation:"):
        (i,) = [n for n, line in enumerate(lines) if line.strip().startswith(key)]
        # the comment sits right above the field, or above the list item holding it
        above = [line.strip() for line in lines[max(0, i - 4) : i]]
        assert any(a.startswith("#") for a in above), f"agent.yaml:{i + 1} `{key}`: no comment"


def test_agent_mounts_host_paths_read_only_at_the_same_paths() -> None:
    _, spec, c = agent()
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    for name, host_path in host_paths.items():
        assert mounts[name].get("readOnly") is True, f"{host_path} is mounted writable"
    by_host = {host_paths[n]: m["mountPath"] for n, m in mounts.items() if n in host_paths}
    # Same path inside as on the node: /lib/modules/<release>/build is an absolute link
    # into /usr/src, which must resolve in the container as on the node.
    for path in HOST_MOUNTS:
        assert by_host.get(path) == path, f"{path} not mounted at {path}"
    assert "/" in by_host, "the node's root (where process binaries are read) is not mounted"
    assert set(by_host) == {*HOST_MOUNTS, "/"}, "an unexpected host path is mounted"


def test_this_hosts_kernel_headers_resolve_inside_the_agents_mounts() -> None:
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.is_symlink():
        pytest.skip(f"{build} is not a link on this host")
    target = Path(os.readlink(build))
    target = target if target.is_absolute() else (build.parent / target).resolve()
    assert any(target.is_relative_to(p) for p in HOST_MOUNTS), f"{build} -> {target}"


def test_agent_node_name_comes_from_the_downward_api() -> None:
    _, _, c = agent()
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.mark.parametrize("kind", ["DaemonSet", "Deployment"])
def test_liveness_and_readiness_are_distinct_grpc_health_checks(kind: str) -> None:
    _, spec = next((d, s) for d, s in pod_specs(rendered()) if d["kind"] == kind)
    (c,) = spec["containers"]
    live, ready = c["livenessProbe"]["grpc"], c["readinessProbe"]["grpc"]
    ports = {p["containerPort"] for p in c["ports"]}
    assert live["port"] in ports and ready["port"] in ports
    assert live.get("service", "") != ready.get("service", "")
    # kubelet's gRPC probe speaks plaintext only: the health port must not be the TLS one.
    grpc_port = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
    assert live["port"] not in grpc_port


def test_agent_config_change_rolls_the_pods() -> None:
    docs = rendered()
    _, _, c = agent()
    refs = {
        e["valueFrom"]["configMapKeyRef"]["name"]
        for e in c["env"]
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert refs, "the agent reads no ConfigMap"
    for name in refs:
        cm = one(docs, "ConfigMap", name)
        # hashed name: kustomize rewrites the reference, so new content = new pod template
        assert cm["metadata"]["annotations"]["test/name-suffix-hash"] == "true"


# --- control plane -----------------------------------------------------------------


def _flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_control_plane_keeps_its_event_log_and_policy_on_the_right_volumes() -> None:
    docs = rendered()
    dep = one(docs, "Deployment", "goleash-control-plane")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}

    def volume_of(path: str) -> dict[str, Any]:
        m = max(
            (m for m in c["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])),
            key=lambda m: len(m["mountPath"]),
        )
        assert "subPath" not in m, "a subPath mount never sees ConfigMap updates"
        return volumes[m["name"]]

    db = volume_of(_flag(c["args"], "--db"))
    one(docs, "PersistentVolumeClaim", db["persistentVolumeClaim"]["claimName"])
    policy_path = _flag(c["args"], "--policy")
    cm = one(docs, "ConfigMap", volume_of(policy_path)["configMap"]["name"])
    assert Path(policy_path).name in cm["data"]
    # unhashed: the control plane hot-reloads it and keeps the old one if it is invalid
    assert cm["metadata"]["annotations"]["test/name-suffix-hash"] == "false"


def test_services_select_their_pods_and_name_existing_ports() -> None:
    docs = rendered()
    pods = [(d["spec"]["template"]["metadata"]["labels"], s) for d, s in pod_specs(docs)]
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        matched = [s for labels, s in pods if sel.items() <= labels.items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)}"
        names = {p["name"] for c in matched[0]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names
    cp = one(docs, "Service", "goleash-control-plane")
    assert {p["name"]: p["port"] for p in cp["spec"]["ports"]}["grpc"] == 7070
    assert "metrics" in {p["name"] for p in cp["spec"]["ports"]}


def test_default_policy_has_the_design_goroutine_levels_and_ships_in_monitor_mode() -> None:
    policy = yaml.safe_load((BASE / "policy.yaml").read_text())
    assert policy["mode"] == "monitor"
    levels = {
        lv["level"]: lv["above"]
        for rule in policy["rules"]
        if rule["signal"]["kind"] == "goroutines"
        for lv in rule["levels"]
    }
    assert levels == {"L1": 3000, "L2": 5000, "L3": 8000}


def test_default_policy_passes_the_control_planes_policy_gate() -> None:
    from goleash.control import policy

    doc = policy.validate_policy((BASE / "policy.yaml").read_text())
    assert doc.mode == "monitor"


# --- RBAC --------------------------------------------------------------------------


@pytest.mark.parametrize("root", [BASE, TLS_OVERLAY], ids=lambda p: p.name)
def test_rbac_grants_only_get_and_patch_of_apps_workloads_per_namespace(root: Path) -> None:
    docs = rendered(root) + [d for p in OPT_IN for d in load_docs(p)]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "nothing cluster-wide"
    roles = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"
    }
    assert roles, "the kubernetes fallback action has no Role anywhere"
    for (ns, name), role in roles.items():
        assert ns != "goleash", "the control plane needs no rights in its own namespace"
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["apps"], f"Role {ns}/{name}: {rule}"
            assert set(rule["resources"]) <= DEGRADE_RESOURCES, f"Role {ns}/{name}: {rule}"
            assert set(rule["verbs"]) <= DEGRADE_VERBS, f"Role {ns}/{name}: {rule}"
            assert "*" not in rule.get("resourceNames", [])
    sa = ("goleash", "goleash-control-plane")
    for rb in (d for d in docs if d["kind"] == "RoleBinding"):
        ns = rb["metadata"]["namespace"]
        assert rb["roleRef"]["kind"] == "Role" and (ns, rb["roleRef"]["name"]) in roles
        assert [(s["namespace"], s["name"]) for s in rb["subjects"]] == [sa]
    # The agent never talks to the API server.
    agent_sa = one(docs, "ServiceAccount", "goleash-agent")
    assert agent_sa["automountServiceAccountToken"] is False


# --- ServiceMonitor (no core schema: checked against what it points at) ------------


def test_service_monitor_scrapes_existing_metrics_ports() -> None:
    (sm,) = load_docs(BASE / "servicemonitor.yaml")
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    spec = sm["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    selected = [
        d
        for d in rendered()
        if d["kind"] == "Service"
        and d["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
        and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert {d["metadata"]["name"] for d in selected} == {"goleash-agent", "goleash-control-plane"}
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        for svc in selected:
            assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}


# --- the image and the CLI ---------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    rest: str


def dockerfile() -> list[Instruction]:
    out, pending = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip()))
        pending = ""
    return out


def exec_form(instructions: list[Instruction], keyword: str) -> list[str]:
    (last,) = [i for i in instructions if i.keyword == keyword][-1:]
    value = json.loads(last.rest)  # shell form would wrap goleash in /bin/sh -c
    assert isinstance(value, list)
    return value


def test_image_is_built_like_the_dev_venv() -> None:
    ins = dockerfile()
    assert ins[0].keyword == "FROM" and ins[0].rest.startswith("debian:bookworm")
    runs = " ".join(i.rest for i in ins if i.keyword == "RUN")
    assert re.search(r"apt-get install .*\bpython3-bpfcc\b", runs)
    assert re.search(r"apt-get install .*\bbpfcc-tools\b", runs)
    venv = re.search(r"/usr/bin/python3 -m venv --system-site-packages (\S+)", runs)
    assert venv, "the venv must see Debian's dist-packages, where the bcc module lives"
    pip = f"{venv.group(1)}/bin/pip install"
    installs = [shlex.split(c) for c in runs.split("&&") if pip in c]
    assert any(a.endswith("requirements.txt") for c in installs for a in c)
    wheels = [c for c in installs if "--no-deps" in c and any(a.endswith(".whl") for a in c)]
    assert wheels, "goleash itself, from the wheel the build stage made"
    env_path = next(i.rest for i in ins if i.keyword == "ENV" and i.rest.startswith("PATH="))
    assert env_path.startswith(f"PATH={venv.group(1)}/bin:")


def test_image_installs_a_wheel_and_carries_no_source_tree() -> None:
    # The build stage copies the sources and makes a wheel (BPF C and policies inside
    # as package data); the final stage copies only that wheel.
    ins = dockerfile()
    froms = [n for n, i in enumerate(ins) if i.keyword == "FROM"]
    assert len(froms) >= 2, "a build stage and the runtime stage"
    copies = [(n, i.rest.split()) for n, i in enumerate(ins) if i.keyword == "COPY"]
    from_context = [args for _n, args in copies if not args[0].startswith("--from=")]
    for *srcs, _dest in from_context:
        for src in srcs:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    copied = {src: dest for *srcs, dest in from_context for src in srcs}
    assert copied.get("agent") == "./agent" and copied.get("bpf") == "./bpf"
    final = [args for n, args in copies if n > froms[-1]]
    assert all(args[0].startswith("--from=") or args[0] == "requirements.txt" for args in final)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} excluded from the context"


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion from the container's env."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def container_argvs() -> list[tuple[str, list[str]]]:
    """What each container runs: its command (or the image's ENTRYPOINT) plus args."""
    ins = dockerfile()
    entrypoint, cmd = exec_form(ins, "ENTRYPOINT"), exec_form(ins, "CMD")
    argvs = [("Dockerfile ENTRYPOINT+CMD", entrypoint + cmd)]
    for root in (BASE, TLS_OVERLAY):
        docs = rendered(root)
        for d, spec in pod_specs(docs):
            for c in spec["containers"]:
                env = {}
                for e in c.get("env", []):
                    src = e.get("valueFrom", {})
                    if "value" in e:
                        env[e["name"]] = e["value"]
                    elif "fieldRef" in src:
                        env[e["name"]] = "node-a"
                    elif "configMapKeyRef" in src:
                        ref = src["configMapKeyRef"]
                        env[e["name"]] = one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
                argv = (c.get("command") or entrypoint) + (c.get("args") or cmd)
                argv = [_expand(a, env) for a in argv]
                leftover = [a for a in argv if "$(" in a]
                assert not leftover, f"{d['kind']}/{c['name']}: unresolved {leftover}"
                argvs.append((f"{root.name} {d['kind']}/{c['name']}", argv))
    return argvs


def goleash_script() -> Path:
    script = Path(sys.executable).with_name("goleash")
    assert script.exists(), f"{script}: goleash is not installed in this venv (make setup)"
    return script


def test_entry_points_are_subcommands_of_the_cli() -> None:
    subcommands = set()
    for where, argv in container_argvs():
        assert argv[0] == "goleash", f"{where} runs {argv[0]}, not the goleash console script"
        subcommands.add(argv[1])
    assert subcommands == {"agent", "control-plane"}
    for sub in sorted(subcommands):
        out = subprocess.run(
            [str(goleash_script()), sub, "--help"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, f"goleash {sub} --help: {out.stderr.strip()}"


def test_every_flag_the_manifests_pass_is_accepted_by_the_cli(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from goleash.cli import build_parser

    for where, argv in container_argvs():
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            err = capsys.readouterr().err.strip().splitlines()[-1:]
            pytest.fail(f"{where}: `{shlex.join(argv)}` rejected by the CLI: {err}")


def test_image_tag_matches_the_package_version() -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert [(i["name"], i["newTag"]) for i in kust["images"]] == [("goleash", version)]
    for _, spec in pod_specs(rendered()):
        assert {c["image"] for c in spec["containers"]} == {f"goleash:{version}"}
    label = re.search(
        r'org\.opencontainers\.image\.version="([^"]+)"', (DEPLOY / "Dockerfile").read_text()
    )
    assert label and label[1] == version


# --- authentication: tokens, NetworkPolicy, the TLS overlay's certificates -----------


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("root", [BASE, TLS_OVERLAY], ids=lambda p: p.name)
def test_no_secret_is_optional_and_nothing_runs_insecure(root: Path) -> None:
    for d in rendered(root):
        where = f"{d['kind']}/{d['metadata']['name']}"
        for path, key, value in _walk(d):
            assert not (key == "optional" and value is True), f"{where}{path}: optional: true"
    for where, argv in container_argvs():
        assert "--insecure" not in argv, f"{where} turns authentication off"
        assert "--token" not in argv, f"{where}: a token on the command line is visible in ps"


def _mounted_secret(spec: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file at `path` comes from."""
    m = max(
        (m for m in c["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])),
        key=lambda m: len(m["mountPath"]),
    )
    vol = {v["name"]: v for v in spec["volumes"]}[m["name"]]
    assert "secret" in vol, f"{path} is not from a Secret"
    rel = str(Path(path).relative_to(m["mountPath"]))
    items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
    return vol["secret"]["secretName"], items.get(rel, rel) if items else rel


@pytest.mark.parametrize("root", [BASE, TLS_OVERLAY], ids=lambda p: p.name)
def test_every_role_has_a_token_from_a_required_secret(root: Path) -> None:
    docs = rendered(root)
    dep = one(docs, "Deployment", "goleash-control-plane")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    sources = {
        role: _mounted_secret(spec, c, _flag(c["args"], f"--{role}-token-file"))
        for role in ("agent", "viewer", "admin")
    }
    assert sources == {r: ("goleash-tokens", r) for r in ("agent", "viewer", "admin")}
    # the agent pod holds its own role's token and no other
    _, aspec, ac = agent() if root == BASE else (None, *_agent_of(docs))
    assert _mounted_secret(aspec, ac, _flag(ac["args"], "--token-file")) == (
        "goleash-tokens",
        "agent",
    )
    for v in aspec["volumes"]:
        if v.get("secret", {}).get("secretName") == "goleash-tokens":
            assert [i["key"] for i in v["secret"]["items"]] == ["agent"]
    # the control plane listens off loopback: its own start-up gate must pass
    from goleash.cli import build_parser

    args = build_parser().parse_args(container_argv(root, "Deployment")[1:])
    assert not args.insecure and args.listen.startswith("0.0.0.0:")


def _agent_of(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    ds = one(docs, "DaemonSet", "goleash-agent")
    spec = ds["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def container_argv(root: Path, kind: str) -> list[str]:
    (argv,) = [a for where, a in container_argvs() if where.startswith(f"{root.name} {kind}/")]
    return argv


def test_control_plane_accepts_the_manifests_credentials_and_refuses_without(
    tmp_path: Path,
) -> None:
    """The manifests' control-plane flags with the Secret's files present start the
    real server's security gate; the same flags without tokens are refused."""
    from goleash.cli import _auth_config, build_parser
    from goleash.control.server import ControlPlane, ControlPlaneConfig, ServerSetupError
    from goleash.control.transport import check_security

    args = build_parser().parse_args(container_argv(BASE, "Deployment")[1:])
    for role in ("agent", "viewer", "admin"):
        (tmp_path / role).write_text(f"{role}-" + "0" * 32 + "\n")
    args.agent_token_file = [str(tmp_path / "agent")]
    args.viewer_token_file = [str(tmp_path / "viewer")]
    args.admin_token_file = [str(tmp_path / "admin")]
    cfg = ControlPlaneConfig(listen=args.listen, db=":memory:", credentials=_auth_config(args))
    cp = ControlPlane(cfg)
    check_security(cfg, cp.authenticator, None)  # passes: tokens for every role
    assert cp.authenticator.enabled and len(cp.authenticator.tokens) == 3
    args.agent_token_file = args.viewer_token_file = args.admin_token_file = None
    bare = ControlPlane(
        ControlPlaneConfig(listen=args.listen, db=":memory:", credentials=_auth_config(args))
    )
    with pytest.raises(ServerSetupError, match="refusing to listen"):
        check_security(bare.config, bare.authenticator, None)


def _labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policy_lets_only_agents_and_admin_clients_reach_the_api_port() -> None:
    docs = rendered()
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    dep = one(docs, "Deployment", "goleash-control-plane")
    ds = one(docs, "DaemonSet", "goleash-agent")
    cp_labels = dep["spec"]["template"]["metadata"]["labels"]
    agent_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(np["spec"]["podSelector"], cp_labels)
    assert not _labels_match(np["spec"]["podSelector"], agent_labels)
    api_rules = [
        r for r in np["spec"]["ingress"] if 7070 in {p["port"] for p in r.get("ports", [])}
    ]
    (rule,) = api_rules
    peers = rule["from"]  # a rule without `from` would let everyone in
    agents = [p for p in peers if "namespaceSelector" not in p]
    assert [p["podSelector"] for p in agents] and all(
        _labels_match(p["podSelector"], agent_labels) for p in agents
    )
    others = [p for p in peers if "namespaceSelector" in p]
    for p in others:  # from other namespaces: only pods that carry the opt-in label
        assert p["podSelector"]["matchLabels"] == {"goleash.io/api-client": "true"}
    # the other open ports are health and metrics, never the API
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    names = {p["containerPort"]: p["name"] for p in c["ports"]}
    for r in np["spec"]["ingress"]:
        if r is not rule:
            assert {names[p["port"]] for p in r["ports"]} <= {"health", "metrics"}


def test_tls_overlay_issues_separate_server_and_client_certificates() -> None:
    docs = rendered(TLS_OVERLAY)
    certs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    ca = [n for n, c in certs.items() if c.get("isCA")]
    assert len(ca) == 1
    leaves = {n: c for n, c in certs.items() if not c.get("isCA")}
    assert len({c["secretName"] for c in certs.values()}) == len(certs), "one Secret each"
    for name, c in leaves.items():
        issuer = issuers[c["issuerRef"]["name"]]
        assert issuer["ca"]["secretName"] == certs[ca[0]]["secretName"], name
        usages = set(c["usages"])
        assert ("server auth" in usages) != ("client auth" in usages), f"{name}: {usages}"
    server = [c for c in leaves.values() if "server auth" in c["usages"]]
    clients = [c for c in leaves.values() if "client auth" in c["usages"]]
    (server_cert,) = server
    assert len(clients) >= 2

    dep = one(docs, "Deployment", "goleash-control-plane")
    dspec = dep["spec"]["template"]["spec"]
    (dc,) = dspec["containers"]
    assert (
        _mounted_secret(dspec, dc, _flag(dc["args"], "--tls-cert"))[0]
        == (server_cert["secretName"])
    )
    aspec, ac = _agent_of(docs)
    agent_secret, _ = _mounted_secret(aspec, ac, _flag(ac["args"], "--tls-cert"))
    agent_cert = next(c for c in clients if c["secretName"] == agent_secret)
    # the roles the control plane gives certificates are exactly the client ones'
    roles = dict(
        r.rsplit("=", 1)
        for r in [a.split("=", 1)[1] for a in dc["args"] if a.startswith("--client-role=")]
    )
    assert set(roles) == {u for c in clients for u in c["uris"]}
    assert roles[agent_cert["uris"][0]] == "agent"
    assert "admin" in roles.values() and not set(server_cert.get("uris", [])) & set(roles)
    # the agent verifies the control plane by the name it dials
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "GOLEASH_SERVER" in d["data"])
    assert cm["data"]["GOLEASH_SERVER"].rsplit(":", 1)[0] in server_cert["dnsNames"]
