"""Generate the Python gRPC code of proto/goleash/v1 into agent/goleash/api/.

    python scripts/genproto.py [OUT_DIR]     (default: agent/goleash/api)

protoc names Python modules after proto import paths (`goleash.v1.types_pb2`), but
the code lives inside the `goleash` package at `goleash.api.goleash.v1`; the
imports are rewritten to that. Output is deterministic for a given grpcio-tools
version (pinned in requirements.txt), which is what lets
tests/unit/test_proto_fresh.py compare a fresh generation with the committed one.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
DEFAULT_OUT = REPO / "agent" / "goleash" / "api"
GENERATED = ("goleash",)  # top-level directories under OUT that this script owns
_IMPORT = re.compile(r"^from goleash\.v1 import ", re.M)
_INIT = '"""Generated from proto/goleash/v1 by scripts/genproto.py (`make proto`)."""\n'


def protos() -> list[Path]:
    return sorted((PROTO_ROOT / "goleash" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write the generated package under `out`/goleash/v1; return the files written."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos()),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see above)")
        for name in GENERATED:
            shutil.rmtree(out / name, ignore_errors=True)
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            dest = out / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_IMPORT.sub("from goleash.api.goleash.v1 import ", src.read_text()))
            written.append(dest)
    for pkg in (out / "goleash", out / "goleash" / "v1"):
        (pkg / "__init__.py").write_text(_INIT)
        written.append(pkg / "__init__.py")
    return sorted(written)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
