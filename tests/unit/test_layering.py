"""DESIGN.md's import rules, checked arrow by arrow over every module's source.

The rules are documented in DESIGN.md ("Who may import whom"); this test is their
enforcement. It reads imports statically (including ones inside functions, which
is where optional heavy imports such as bcc live), so a rule broken on a code path
no other test runs is still caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "goleash"

# Which parts of goleash each part may import (itself always allowed). A "part" is a
# subpackage (gobin, probes, ...) or a top-level module (cli, embedded, ...).
# Leaves are modules every part may use because they use nothing of goleash but
# errors: the exception base, the profile encoders (pprof/folded), the recording
# format and its diff (written by node, read by control), the OTLP bridge of a
# Prometheus registry, signal handling, the rules of the caches on disk (cachefiles);
# and `goleash`, the package face (__version__).
LEAVES = {"errors", "profiles", "recdiff", "otlp", "signals", "cachefiles"}
COMMON = LEAVES | {"goleash"}
MAY_IMPORT: dict[str, set[str]] = {
    "gobin": COMMON,
    "probes": COMMON | {"gobin", "api"},
    "node": COMMON | {"probes", "gobin", "api"},
    "control": COMMON | {"api"},
    "api": set(),
    "embedded": COMMON | {"node", "control", "api"},
    "cli": COMMON | {"node", "probes", "gobin", "control", "api", "embedded"},
    "bench": COMMON | {"node", "probes", "gobin", "control", "api", "gobuild"},
    "demo": COMMON | {"node", "control", "api", "gobuild", "embedded"},
    "gobuild": COMMON,
    "goleash": set(),
    **{leaf: {"errors", "goleash"} for leaf in LEAVES},
}
# Only probes talks to BCC: everything else stays importable without it.
MAY_IMPORT_BCC = {"probes"}


def _part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "goleash"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones too."""
    module = _module_name(path, package_dir)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from goleash import fixtures` imports the module goleash.fixtures;
            # `from goleash import __version__` only the package face.
            if target == "goleash":
                for a in node.names:
                    is_module = (package_dir / a.name).is_dir() or (
                        package_dir / f"{a.name}.py"
                    ).exists()
                    out.append((node.lineno, f"goleash.{a.name}" if is_module else "goleash"))
            else:
                out.append((node.lineno, target))
    return out


def _sources(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "api" not in p.relative_to(package).parts)


def _violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in _sources(package):
        me = _part_of(_module_name(path, package))
        allowed = MAY_IMPORT.get(me)
        where = path.relative_to(package.parent)
        if allowed is None:
            bad.append(f"{where}: part '{me}' has no row in MAY_IMPORT (add it, and to DESIGN.md)")
            continue
        for line, target in _imports(path, package):
            top = target.split(".")[0]
            if top == "bcc" and me not in MAY_IMPORT_BCC:
                bad.append(f"{where}:{line}: {me} imports bcc (only probes may)")
            elif top == "goleash":
                other = _part_of(target)
                if other != me and other not in allowed:
                    bad.append(f"{where}:{line}: {me} imports goleash.{other}")
    return bad


def test_every_import_follows_the_design_arrows() -> None:
    assert _violations() == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    # The rule is only as good as the import reader: prove it reads the forms the
    # code uses, on a package shaped like the real one.
    for part in ("control", "probes", "node"):
        (tmp_path / "goleash" / part).mkdir(parents=True)
    control = tmp_path / "goleash" / "control"
    (control / "__init__.py").write_text("from . import state\n")
    (control / "state.py").write_text(
        "def f():\n    from bcc import BPF\n    from ..probes import uprobe\n"
        "from goleash import node\nfrom goleash.api import x\n"
    )
    found = _violations(tmp_path / "goleash")
    assert any("imports bcc" in v for v in found)
    assert any("imports goleash.probes" in v for v in found)
    assert any("imports goleash.node" in v for v in found)


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_the_table_names_only_real_parts(part: str) -> None:
    assert (PACKAGE / part).is_dir() or (PACKAGE / f"{part}.py").exists() or part == "goleash"
