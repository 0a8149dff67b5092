"""The committed generated code in agent/goleash/api/ matches proto/ (run `make proto`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "agent" / "goleash" / "api"


def _genproto():
    spec = importlib.util.spec_from_file_location("genproto", REPO / "scripts" / "genproto.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted((root / "goleash").rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_api_is_fresh(tmp_path: Path) -> None:
    _genproto().generate(tmp_path)
    fresh, committed = _tree(tmp_path), _tree(COMMITTED)
    assert fresh, "genproto generated nothing"
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    stale = sorted(
        name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name]
    )
    assert not (missing or extra or stale), (
        f"agent/goleash/api is stale (run `make proto` and commit): missing {missing}, "
        f"left over {extra}, differing {stale}"
    )


def test_generated_api_imports_inside_goleash() -> None:
    from goleash.api.goleash.v1 import goleash_service_pb2_grpc, ingest_service_pb2

    batch = ingest_service_pb2.AgentBatch(sequence=1)
    assert ingest_service_pb2.AgentBatch.FromString(batch.SerializeToString()).sequence == 1
    assert hasattr(goleash_service_pb2_grpc, "GoleashServiceStub")
