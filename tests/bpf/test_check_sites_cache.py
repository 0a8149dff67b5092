"""`goleash check` remembers where its probes go in a test binary by the binary's
content (node/checksites.py): `go test` links the same bytes again when the code did
not change, and the run that meets them again skips their analysis while they wait
stopped at exec. Real runs on the fixture module, with a cache of their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gobuild

pytestmark = pytest.mark.root

MODULE = gobuild.FIXTURES / "leakcheck"
AGENT = Path(__file__).resolve().parents[2] / "agent"
LEAKING = {
    ("example.com/leakcheck/chanleak", "TestWatchLeaks"),
    ("example.com/leakcheck/tickleak", "TestPollLeaks"),
}


@pytest.fixture
def cache_home(tmp_path: Path) -> Path:
    """An empty site cache; the compiled BPF program copied in when there is one, so
    the test does not wait for a compile."""
    home = tmp_path / "cache"
    (home / "goleash").mkdir(parents=True, mode=0o700)
    os.chmod(home / "goleash", 0o700)
    xdg = os.environ.get("XDG_CACHE_HOME")
    bpf = Path(xdg) / "goleash" / "bpf" if xdg else Path("/var/cache/goleash/bpf")
    if bpf.is_dir():
        shutil.copytree(bpf, home / "goleash" / "bpf")
        os.chmod(home / "goleash" / "bpf", 0o700)
    return home


def _check(home: Path, *pkgs: str) -> dict:
    toolchain = gobuild.TOOLCHAINS[-1]
    env = gobuild.go_env(toolchain)
    env["PYTHONPATH"] = str(AGENT)
    env["XDG_CACHE_HOME"] = str(home)
    # Through a shell: a command other than `go test` is held before its exec until the
    # probes follow it, so the shell and `go` are judged on every machine (`go test`'s
    # own toolchain execs are not when its build cache is warm).
    script = "exec go test -count=1 " + " ".join(pkgs)
    res = subprocess.run(
        [sys.executable, "-m", "goleash.cli", "check", "--json", "--", "sh", "-c", script],
        cwd=MODULE,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout)


def _leaking(rep: dict) -> set[tuple[str, str]]:
    return {(lk["package"], lk["test"]) for lk in rep["leaks"]}


def _entries(home: Path) -> list[Path]:
    """The test binaries' entries (named by SHA-256; `skip-*`: not followed)."""
    return sorted((home / "goleash" / "check").glob("[0-9a-f]*.json"))


def test_a_later_run_places_probes_from_the_stored_sites(cache_home: Path) -> None:
    first = _check(cache_home, "./chanleak", "./tickleak")
    assert _leaking(first) == LEAKING
    entries = _entries(cache_home)
    assert len(entries) == 2  # one per test binary
    # What is not followed (the shell, the toolchain's `go`) is kept by file identity,
    # never hashed.
    skips = (cache_home / "goleash" / "check").glob("skip-*.json")
    reasons = {json.loads(p.read_text())["skip"].split(" (")[0] for p in skips}
    assert {"not a Go program", "Go toolchain"} <= reasons
    # Where their goroutines were found is kept too (a stripped binary's is dear).
    assert all(json.loads(e.read_text())["layout"] for e in entries)
    second = _check(cache_home, "./chanleak", "./tickleak")
    assert _leaking(second) == LEAKING
    assert _entries(cache_home) == entries  # the same bytes: nothing new stored
    # The stored sites are what a later run attaches at: without the testing.tRunner
    # site in them, its processes are no test binaries and no test is seen.
    for e in entries:
        raw = json.loads(e.read_text())
        raw["trunner"] = None
        e.write_text(json.dumps(raw))
    third = _check(cache_home, "./chanleak", "./tickleak")
    assert [p["test_binary"] for p in third["processes"]] == [False, False]
    assert all(p["tests"] == [] for p in third["processes"])


def test_a_wrong_kept_layout_is_found_again(cache_home: Path) -> None:
    _check(cache_home, "./chanleak")
    [entry] = _entries(cache_home)
    raw = json.loads(entry.read_text())
    right = raw["layout"]
    raw["layout"] = [right[0] + 0x1000, None, None, right[3]]
    entry.write_text(json.dumps(raw))
    rep = _check(cache_home, "./chanleak")
    # Read right all the same: a wrong layout would read no goroutine, no leak.
    assert _leaking(rep) == {("example.com/leakcheck/chanleak", "TestWatchLeaks")}, rep
    # And kept right (or forgotten, when this read failed for another reason).
    assert json.loads(entry.read_text())["layout"] in (right, None), rep


def test_damaged_entries_are_analysed_again(cache_home: Path) -> None:
    _check(cache_home, "./chanleak", "./tickleak")
    entries = _entries(cache_home)
    assert len(entries) == 2
    for e in entries:
        raw = json.loads(e.read_text())
        raw["process_exit"]["file_offset"] = 1 << 40  # past the end of the file
        e.write_text(json.dumps(raw))
    rep = _check(cache_home, "./chanleak", "./tickleak")
    assert _leaking(rep) == LEAKING
    assert all(p["captured_at_exit"] and p["test_binary"] for p in rep["processes"])
    for e in entries:  # stored again, right
        assert json.loads(e.read_text())["process_exit"]["file_offset"] < 1 << 40


def _leak_sites(rep: dict) -> set[tuple[str, str, str]]:
    return {(lk["test"], lk["function"], lk["go_statement"]) for lk in rep["leaks"]}


def test_kept_started_functions_never_hide_a_leak(cache_home: Path) -> None:
    """The function each `go f(x)` wrapper starts is kept with the sites (a later run
    names sites without a disassembler); a kept name that would make the user's
    goroutine the runtime's (never a leak) is not believed."""
    first = _check(cache_home, "./chanleak", "./tickleak")
    assert _leaking(first) == LEAKING
    entries = _entries(cache_home)
    wrappers = set()
    for e in entries:
        kept = json.loads(e.read_text())["started"]
        assert kept is not None, "a run that read the goroutines keeps what they start"
        wrappers |= {w for w, _ in kept}
    # The fixtures' leaking goroutines are started by such wrappers (`go watch(...)`).
    assert {"example.com/leakcheck/chanleak.Watch.gowrap1"} <= wrappers
    for e in entries:
        raw = json.loads(e.read_text())
        raw["started"] = [[w, "runtime.gcBgMarkWorker"] for w, _ in raw["started"]]
        e.write_text(json.dumps(raw))
    second = _check(cache_home, "./chanleak", "./tickleak")
    assert _leak_sites(second) == _leak_sites(first)
