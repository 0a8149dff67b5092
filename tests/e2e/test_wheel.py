"""`pip install` of goleash's wheel works anywhere: a wheel built from a copy of the
sources, installed into a fresh virtualenv (system site packages: BCC comes from
Debian), runs `goleash inspect` and `goleash trace` with real probes from a directory
outside the checkout, with nothing of the checkout on its path.

Dependencies come from a wheelhouse of requirements.txt's pins, downloaded once per
pin set into $GOLEASH_CACHE/wheelhouse, and installed with --no-index: the install
resolves exactly the dependencies the wheel declares, so one missing from
pyproject.toml fails the import of every module below.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from populations import running_populations

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GOLEASH_CACHE", "/var/cache/goleash"))
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
# Modules that need an optional extra (pip install 'goleash[otlp]').
OPTIONAL = ("goleash.otlp",)


def _wheelhouse() -> Path:
    reqs = REPO / "requirements.txt"
    house = CACHE / "wheelhouse" / hashlib.sha256(reqs.read_bytes()).hexdigest()[:16]
    if not (house / ".complete").exists():
        house.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*PIP, "download", "--only-binary=:all:", "-r", str(reqs), "-d", str(house)],
            check=True,
            timeout=300,
        )
        (house / ".complete").touch()
    return house


def _build_wheel(work: Path) -> Path:
    # A copy, so the build leaves nothing in the checkout (setuptools writes build/).
    src = work / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".*")
    for part in ("agent", "bpf"):
        shutil.copytree(REPO / part, src / part, symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = work / "dist"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)],
        check=True,
        timeout=120,
    )
    (wheel,) = dist.glob("goleash-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(work)
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in (
        "goleash/bpf/goleash.h",
        "goleash/bpf/goroutines.bpf.c",
        "goleash/bpf/funclat.bpf.c",
        "goleash/bpf/helpers.bpf.h",
        "goleash/demo/policy.yaml",
        "goleash/gobin/offsets_table.json",
        "goleash/goprograms/demoserver/main.go",
        "goleash/goprograms/benchload/go.mod",
    ):
        assert data in names, f"the wheel lacks {data}"
    venv = work / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
        check=True,
        timeout=120,
    )
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-compile",  # kubernetes alone is thousands of modules: 30 s of bytecode
            "--no-index",
            "--find-links",
            str(_wheelhouse()),
            str(wheel),
        ],
        check=True,
        timeout=300,
        # Not the test's PYTHONPATH: pip would take the checkout's goleash as installed.
        env=_outside(),
    )
    return venv


def _outside() -> dict[str, str]:
    """Environment of a user who is not in the checkout: no PYTHONPATH, cwd elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def _last_json(text: str) -> dict:
    """The last of the JSON objects `trace --json` printed (one per summary)."""
    decoder, pos, last = json.JSONDecoder(), 0, None
    while (start := text.find("{", pos)) >= 0:
        last, pos = decoder.raw_decode(text, start)
    assert last is not None, text
    return dict(last)


def test_every_module_imports_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    code = (
        "import importlib, json, pkgutil, goleash\n"
        f"optional = {OPTIONAL!r}\n"
        "names = [m.name for m in pkgutil.walk_packages(goleash.__path__, 'goleash.')]\n"
        "for n in names:\n"
        "    if n not in optional and not n.endswith('__main__'): importlib.import_module(n)\n"
        "from goleash.probes.bpfsrc import bpf_dir\n"
        "print(json.dumps({'file': goleash.__file__, 'bpf': str(bpf_dir()), 'n': len(names)}))\n"
    )
    res = subprocess.run(
        [str(installed / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env=_outside(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    site = str(installed / "lib")
    assert out["file"].startswith(site) and out["bpf"].startswith(site), out
    assert not out["bpf"].startswith(str(REPO)) and out["n"] > 40


def test_installed_goleash_inspects_and_traces_with_real_probes(
    installed: Path, tmp_path: Path
) -> None:
    goleash = str(installed / "bin" / "goleash")
    env = _outside()
    with running_populations("1.22.10", orphan=7, sleeper=2) as pop:
        res = subprocess.run(
            [goleash, "inspect", "--pid", str(pop.pid), "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["go_version"] == "go1.22.10"
        res = subprocess.run(
            [
                goleash,
                "trace",
                "--pid",
                str(pop.pid),
                "--duration",
                "2",
                "--interval",
                "1",
                "--json",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 0, res.stderr
    summary = _last_json(res.stdout)
    assert summary["mode"] == "probes", summary["mode_reason"]
    live = {s["function"]: s["live"] for s in summary["sites"]}
    assert live["main.orphan"] == 7 and live["main.sleeper"] == 2, live
