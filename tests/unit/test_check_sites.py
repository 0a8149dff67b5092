"""`goleash check`'s cache of probe sites by file content (node/checksites.py): what
is stored comes back as it was, and anything that does not fit is a miss, never a
probe placed from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from goleash.gobin.disasm import GoroutineProbeSites, ProbeSite
from goleash.node import checksites
from goleash.node.checksites import ExecPlan
from goleash.probes.testleaks import CheckSites

DIGEST = "ab" * 32
SIZE = 1 << 20


def _site(name: str, offset: int) -> ProbeSite:
    return ProbeSite(name, 0x400000 + offset, offset, "push rbp", True)


LAYOUT = (0x5A0000, 0x5A0018, 0x5A0020, ("", "GC assist marking", "chan receive"))


STARTED = (
    ("example.com/m.Watch.gowrap1", "example.com/m.watch"),
    ("runtime.gcenable.gowrap1", None),
)


def _plan(
    trunner: bool = True,
    layout: checksites.Layout | None = None,
    started: checksites.Started | None = None,
) -> ExecPlan:
    exit_site = _site("runtime.goexit1", 0x2000)
    g = GoroutineProbeSites(
        create_kind="runqput_call",
        create=_site("runtime.newproc.func1", 0x1000),
        create_rets=[],
        exit=exit_site,
        newproc_entry=exit_site,
        gopark=exit_site,
        gopanic=exit_site,
    )
    tr = _site("testing.tRunner", 0x3000) if trunner else None
    return ExecPlan("go1.22.5", CheckSites(g, tr, _site("runtime.exit", 0x4000)), layout, started)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "goleash" / "check"


@pytest.mark.parametrize(
    ("trunner", "layout", "started"),
    [
        (True, None, None),
        (False, None, None),
        (True, LAYOUT, None),
        (True, (0x5A0000, None, None, ()), ()),
        (True, LAYOUT, STARTED),
    ],
)
def test_a_stored_plan_comes_back_unchanged(
    cache: Path, trunner: bool, layout: checksites.Layout | None, started: checksites.Started
) -> None:
    plan = _plan(trunner, layout, started)
    checksites.store(DIGEST, plan)
    assert (cache / f"{DIGEST}.json").is_file()
    assert checksites.load(DIGEST, SIZE) == plan
    assert checksites.load("cd" * 32, SIZE) is None  # other bytes: nothing stored


def _edit(cache: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = cache / f"{DIGEST}.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(digest="cd" * 32),  # the entry of another file, renamed
        lambda r: r.update(format=0),
        lambda r: r["process_exit"].update(file_offset=SIZE),  # past the file's end
        lambda r: r["process_exit"].update(file_offset=-8),
        lambda r: r["process_exit"].update(file_offset="0x10"),
        lambda r: r["goroutines"].update(create=None),  # runqput kind without its call
        lambda r: r["goroutines"].update(create_kind="elsewhere"),
        lambda r: r["goroutines"]["exit"].pop("vaddr"),
        lambda r: r.update(go_version=7),
        lambda r: r.clear(),
        lambda r: r.update(layout=[0, None, None, []]),  # no allgs
        lambda r: r.update(layout=[0x5A0000, None, None]),
        lambda r: r["layout"][3].append("\x1b[2Jclear screen"),  # reaches terminals
        lambda r: r["layout"][3].extend(["x"] * 300),
        lambda r: r["started"].append(["example.com/m.notawrapper", None]),
        lambda r: r["started"].append(["x.gowrap1", "\x1b[2Jclear screen"]),
        lambda r: r["started"].append(["x.gowrap1"]),
        lambda r: r.update(started={"x.gowrap1": None}),
        lambda r: r["started"].extend([["x.gowrap1", None]] * 5000),
    ],
    ids=[
        "other-digest",
        "other-format",
        "past-end",
        "negative",
        "string-offset",
        "kind-mismatch",
        "unknown-kind",
        "missing-field",
        "bad-version",
        "empty",
        "layout-no-allgs",
        "layout-short",
        "layout-control-chars",
        "layout-too-many-reasons",
        "started-no-wrapper",
        "started-control-chars",
        "started-short",
        "started-not-a-list",
        "started-too-many",
    ],
)
def test_an_entry_that_does_not_fit_is_a_miss(cache: Path, edit) -> None:  # type: ignore[no-untyped-def]
    checksites.store(DIGEST, _plan(layout=LAYOUT, started=STARTED))
    _edit(cache, edit)
    assert checksites.load(DIGEST, SIZE) is None


def test_garbage_is_a_miss(cache: Path) -> None:
    checksites.store(DIGEST, _plan())
    (cache / f"{DIGEST}.json").write_bytes(b"\x00{not json")
    assert checksites.load(DIGEST, SIZE) is None


def test_a_directory_others_can_write_is_not_trusted(cache: Path) -> None:
    checksites.store(DIGEST, _plan())
    os.chmod(cache, 0o777)
    assert checksites.load(DIGEST, SIZE) is None
    checksites.store(DIGEST, _plan())  # and nothing is written there either: no error
    os.chmod(cache, 0o700)
    assert checksites.load(DIGEST, SIZE) == _plan()


def test_the_cache_is_bounded(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksites, "KEEP_ENTRIES", 3)
    digests = [f"{i:02x}" * 32 for i in range(6)]
    for n, d in enumerate(digests):
        checksites.store(d, _plan())
        os.utime(cache / f"{d}.json", (1000 + n, 1000 + n))  # mtime order = age
    left = sorted(p.stem for p in cache.glob("*.json"))
    assert left == sorted(digests[-3:])  # the newest
    assert checksites.load(digests[-1], SIZE) == _plan()


def test_file_digest_is_the_sha256_of_the_whole_file(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "bin"
    data = os.urandom(3 << 20)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert checksites.file_digest(fd) == (hashlib.sha256(data).hexdigest(), len(data))
    finally:
        os.close(fd)


def test_a_file_judged_not_to_follow_is_known_by_its_identity(tmp_path: Path) -> None:
    f = tmp_path / "tool"
    f.write_bytes(b"\x7fELF" + b"\0" * 100)
    ident = checksites.identity(os.stat(f))
    assert checksites.load_skip(ident) is None
    checksites.store_skip(ident, "Go toolchain (cmd/compile)")
    assert checksites.load_skip(ident) == "Go toolchain (cmd/compile)"
    # Written to (a new build in its place): another file, judged again.
    with f.open("ab") as out:
        out.write(b"\0")
    assert checksites.load_skip(checksites.identity(os.stat(f))) is None
