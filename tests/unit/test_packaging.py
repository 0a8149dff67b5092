"""pyproject.toml declares what requirements*.txt pin, and the other way round: the
image installs requirements.txt, `pip install goleash` resolves pyproject.toml, and
both must give the same runtime."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pinned(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            out.add(_name(line))
    return out


def test_runtime_requirements_are_the_declared_dependencies() -> None:
    assert _pinned(REPO / "requirements.txt") == {_name(d) for d in PYPROJECT["dependencies"]}


def test_every_extra_is_pinned_in_its_requirements_file() -> None:
    extras = PYPROJECT["optional-dependencies"]
    assert _pinned(REPO / "requirements-otlp.txt") == {_name(d) for d in extras["otlp"]}
    assert _pinned(REPO / "requirements-dev.txt") == {_name(d) for d in extras["dev"]}


def test_runtime_pins_carry_no_dev_tool() -> None:
    dev_tools = {"pytest", "pytest-timeout", "ruff", "mypy", "grpcio-tools"}
    assert not dev_tools & _pinned(REPO / "requirements.txt")


def test_bpf_sources_reach_the_package_through_one_link() -> None:
    link = REPO / "agent" / "goleash" / "bpf"
    assert link.is_symlink() and link.resolve() == (REPO / "bpf").resolve()
