"""profiles: folded stacks and the pprof profile's shape (inlined calls, labels),
read back by a real `go tool pprof`; views' dump JSON keeps the one schema."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gobuild
from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import views
from goleash.profiles import ProfileFrame, StackSample, folded_text, pprof_goroutine_profile

PARK = ProfileFrame("runtime.gopark", "/go/src/runtime/proc.go", 402, 0x401125)
LEAK = ProfileFrame("main.leak", "/src/main.go", 12, 0x401225, inlined=True)
SERVE = ProfileFrame("main.serve", "/src/main.go", 20, 0x401225)


def test_folded_roots_first_aggregates_and_escapes() -> None:
    odd = ProfileFrame("main.(*T).f;x y")
    text = folded_text(
        [
            StackSample((PARK, LEAK, SERVE), 2),
            StackSample((PARK, LEAK, SERVE), 3, (("state", "select"),)),
            StackSample((odd,), 1),
            StackSample((), 4),  # nothing to draw
        ]
    )
    assert text == "main.(*T).f:x y 1\nmain.serve;main.leak;runtime.gopark 5\n"


def test_go_tool_pprof_reads_inlined_frames_and_labels(tmp_path: Path) -> None:
    samples = [
        StackSample((PARK, LEAK, SERVE), 1, (("state", "chan receive"),)),
        StackSample((PARK, LEAK, SERVE), 1, (("state", "chan receive"),)),
        StackSample((PARK, SERVE), 1, (("state", "select"),)),
    ]
    out = tmp_path / "p.pb.gz"
    out.write_bytes(pprof_goroutine_profile(samples, comments=["hello"]))
    tc = gobuild.TOOLCHAINS[-1]
    res = subprocess.run(
        [str(gobuild.go_root(tc) / "bin" / "go"), "tool", "pprof", "-traces", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=gobuild.go_env(tc),
    )
    assert res.returncode == 0, res.stderr
    traces = res.stdout
    assert "Type: goroutine" in traces and "hello" in traces
    assert "main.leak (inline)" in traces  # one location, two lines
    blocks = traces.split("-----------+")
    chan = next(b for b in blocks if "chan receive" in b)
    assert "\n         2   runtime.gopark" in chan
    sel = next(b for b in blocks if "state:  select" in b)
    assert "main.leak" not in sel


def test_control_plane_dump_json_uses_the_one_schema() -> None:
    r = q.GoroutineRecord(
        service="shop",
        agent_id="a1",
        pid=42,
        goroutine=t.Goroutine(
            goid=7,
            state=t.GOROUTINE_STATE_WAITING,
            wait_reason="chan receive",
            function="main.leak",
            go_statement="/src/main.go:30",
            stack=[t.StackFrame(function="main.leak", file="/src/main.go", line=12, pc=0x10)],
        ),
    )
    doc = views.dump_json([r])
    (g,) = doc["goroutines"]
    assert doc["schema"] == "goleash.dump/v1"
    assert (g["goid"], g["state"], g["parent_goid"], g["blocked_seconds"]) == (
        7,
        "waiting",
        None,
        None,
    )
    assert g["frames"] == [
        {"function": "main.leak", "file": "/src/main.go", "line": 12, "pc": 16, "inlined": False}
    ]
