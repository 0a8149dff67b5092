"""`goleash check`'s pure parts: test names from runner chains, ignore lists, baselines,
exit status and the JUnit file."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from goleash.node.check import (
    CheckReport,
    CheckUsageError,
    FollowedProcess,
    IgnoreList,
    Leak,
    load_baseline,
    split_symbol,
    write_junit,
)
from goleash.node.checktrace import _test_names
from goleash.probes.testleaks import RunnerRecord


def _leak(test: str = "TestFoo", **kw: object) -> Leak:
    base = dict(
        package="example.com/x/store",
        test=test,
        binary="/tmp/store.test",
        function="example.com/x/store.watch",
        go_statement="/src/store/store.go:42",
        created_by="example.com/x/store.New",
        count=3,
        wait_reason="chan receive",
        blocked_s=1.2,
        after_test_s=0.5,
        stack=[
            "runtime.gopark /go/src/runtime/proc.go:1",
            "example.com/x/store.watch /src/store/store.go:50",
        ],
    )
    base.update(kw)
    return Leak(**base)  # type: ignore[arg-type]


def test_headline_reads_like_the_issue() -> None:
    text = _leak().headline()
    assert text.startswith("TestFoo leaked 3 goroutines created at store.go:42 (store.watch)")
    assert "blocked in chan receive for 1.2 s" in text


def test_split_symbol() -> None:
    assert split_symbol("example.com/x/store.TestFoo.func1") == (
        "example.com/x/store",
        "TestFoo.func1",
    )
    assert split_symbol("main.TestBar") == ("main", "TestBar")


def test_names_follow_the_runner_chain_and_skip_the_harness() -> None:
    funcs = {
        0x10: "testing.runTests.func1",
        0x20: "example.com/x/store.TestFoo",
        0x30: "example.com/x/store.TestFoo.func1",
    }
    tab = SimpleNamespace(func_for_pc=lambda pc: SimpleNamespace(name=funcs[pc]))
    tests = {
        1: RunnerRecord(1, 0x10, 0, 1, 0),
        5: RunnerRecord(5, 0x20, 1, 2, 9),
        7: RunnerRecord(7, 0x30, 5, 3, 8),
    }
    names = _test_names(tests, tab)  # type: ignore[arg-type]
    assert names == {
        5: ("example.com/x/store", "TestFoo"),
        7: ("example.com/x/store", "TestFoo/func1"),
    }


def test_ignore_list_matches_top_site_and_function(tmp_path: Path) -> None:
    f = tmp_path / "ignore.yaml"
    f.write_text("ignore:\n  - top: example.com/x/store.watch\n  - site: store/store.go:42\n")
    ign = IgnoreList.load(str(f))
    lk = _leak()
    assert ign.matches(lk.function, lk.go_statement, lk.stack)
    assert IgnoreList(top={"example.com/x/store.watch"}).matches("f", "a.go:1", lk.stack)
    assert not IgnoreList(top={"runtime.gopark"}).matches("f", "a.go:1", lk.stack)
    assert IgnoreList(sites={"store.go:42"}).matches("f", "/src/store/store.go:42", [])
    assert not IgnoreList(sites={"store.go:4"}).matches("f", "/src/store/store.go:42", [])
    assert IgnoreList(functions={"f"}).matches("f", "", [])


@pytest.mark.parametrize(
    "text",
    ["[]", "ignore: 3", "ignore:\n  - nope: x\n", "ignore:\n  - top: ''\n", ":\n -"],
)
def test_bad_ignore_files_are_usage_errors(tmp_path: Path, text: str) -> None:
    f = tmp_path / "ignore.yaml"
    f.write_text(text)
    with pytest.raises(CheckUsageError):
        IgnoreList.load(str(f))


def _report(leaks: list[Leak], exit_code: int | None = 0) -> CheckReport:
    procs = [
        FollowedProcess(
            1, "/tmp/store.test", "go1.22.10", True, ["TestFoo", "TestOk"], "example.com/x/store"
        )
    ]
    return CheckReport(["go", "test", "./..."], exit_code, 1.0, procs, leaks, [])


def test_exit_status() -> None:
    assert _report([]).exit_status() == 0
    assert _report([_leak()]).exit_status() == 1
    assert _report([_leak(known=True)]).exit_status() == 0
    assert _report([_leak()], exit_code=3).exit_status() == 3  # the command's failure wins
    assert _report([], exit_code=2).exit_status() == 2


def test_baseline_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "report.json"
    f.write_text(json.dumps(_report([_leak()]).to_dict()))
    assert _leak().key in load_baseline(str(f))
    # Line-free: the same leak after an edit above the go statement is still known.
    assert _leak(go_statement="/src/store/store.go:45").key in load_baseline(str(f))
    f.write_text("{}")
    with pytest.raises(CheckUsageError):
        load_baseline(str(f))


def test_junit_marks_exactly_the_leaking_tests(tmp_path: Path) -> None:
    out = tmp_path / "junit.xml"
    write_junit(_report([_leak(), _leak(test="TestOk", known=True)]), str(out))
    root = ET.parse(out).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"TestFoo", "TestOk"}
    assert cases["TestFoo"].find("failure") is not None
    assert cases["TestOk"].find("failure") is None  # in the baseline
    assert root.get("failures") == "1"


def test_an_unrecorded_test_end_is_the_exit_only_when_main_exits() -> None:
    from goleash.node.checktrace import MAIN_GOROUTINE, end_of_test_at_exit
    from goleash.probes.testleaks import PROCESS_EXIT, CheckEvent

    ended = RunnerRecord(goid=7, fn_pc=1, parent_test=0, start_ns=10, end_ns=20)
    unrecorded = RunnerRecord(goid=7, fn_pc=1, parent_test=0, start_ns=10, end_ns=0)
    by_main = CheckEvent(PROCESS_EXIT, 42, goid=MAIN_GOROUTINE, ns=99)
    by_test = CheckEvent(PROCESS_EXIT, 42, goid=7, ns=99)
    unknown = CheckEvent(PROCESS_EXIT, 42, goid=0, ns=99)
    assert end_of_test_at_exit(ended, by_test) == 20
    assert end_of_test_at_exit(unrecorded, by_main) == 99
    assert end_of_test_at_exit(unrecorded, by_test) is None
    assert end_of_test_at_exit(unrecorded, unknown) is None


@pytest.mark.parametrize(
    ("command", "gated"),
    [
        (["go", "test", "./..."], True),
        (["/usr/local/go/bin/go", "run", "./cmd/x"], True),
        (["go", "-C", "sub", "test", "./..."], True),
        (["go", "build", "./..."], False),  # nothing it runs goes through -exec
        (["go", "tool", "mytool"], False),
        (["go", "test", "-exec", "sudo", "./..."], False),  # the user's own -exec
        (["go", "test", "--exec=wrap", "./..."], False),
        (["sh", "-c", "go test ./..."], False),
        (["./app.test"], False),
    ],
)
def test_only_go_test_and_go_run_start_unheld(
    command: list[str], gated: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from goleash.node.check import ExecGate

    monkeypatch.delenv("GOFLAGS", raising=False)
    assert (ExecGate.for_command(command, tmp_path) is not None) is gated


def test_gate_env_adds_exec_and_remembers_the_users_goflags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from goleash.node.check import ExecGate

    monkeypatch.setenv("GOFLAGS", "-mod=mod")
    gate = ExecGate.for_command(["go", "test"], tmp_path)
    assert gate is not None
    env = gate.env()
    assert env["GOFLAGS"] == f"-mod=mod -exec={gate.script}"
    assert env["GOLEASH_CHECK_GOFLAGS"] == "-mod=mod"
    monkeypatch.setenv("GOFLAGS", "-exec=mywrapper")
    assert ExecGate.for_command(["go", "test"], tmp_path / "x") is None
