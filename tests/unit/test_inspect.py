"""`goleash inspect`: what a user reads from a Go binary, on every toolchain and
build variant, and the clear errors for everything it cannot trace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import capstone
import pytest

import gobuild
from goleash.cli import main

REPO = Path(__file__).resolve().parents[2]
PROBED = (
    "runtime.newproc",
    "runtime.newproc1",
    "runtime.goexit1",
    "runtime.gopark",
    "runtime.gopanic",
)


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def toolchain_version(toolchain: str) -> str:
    out = subprocess.run(
        [str(gobuild.go_root(toolchain) / "bin" / "go"), "env", "GOVERSION"],
        env=gobuild.go_env(toolchain),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_inspect_every_toolchain_and_variant(
    toolchain: str, variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = gobuild.build("spawner", toolchain, variant)
    r = inspect_json(capsys, str(path))
    assert r["go_version"] == toolchain_version(toolchain)
    assert r["main_module"] == "example.com/spawner"
    assert r["pie"] is (variant == "pie")
    assert r["buildmode"] == ("pie" if variant == "pie" else "exe")
    assert r["cgo"] is (variant == "cgo")
    assert r["trimpath"] is (variant == "trimpath")
    assert r["stripped"] is (variant == "stripped")
    assert r["symbols_source"] == ("pclntab" if variant == "stripped" else "symtab")
    assert r["offsets_source"] == ("table" if variant == "stripped" else "dwarf")
    assert (r["offsets"]["g_parent_goid"] is None) == (toolchain == "1.19")
    assert set(r["probes"]) == set(PROBED)

    # Every site is where it says: the bytes at its file offset decode to the
    # instruction named, and every RET listed for newproc1 is a `ret`.
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    data = path.read_bytes()

    def insn_at(offset: int, vaddr: int = 0) -> str:
        i = next(md.disasm(data[offset : offset + 16], vaddr))
        return f"{i.mnemonic} {i.op_str}".strip()

    for name in PROBED:
        site = r["probes"][name]["probe"]
        assert insn_at(site["file_offset"], site["vaddr"]) == site["instruction"], name
        assert site["emulated"], f"{name}: the probe site should be an emulated instruction"
    rets = r["probes"]["runtime.newproc1"]["rets"]
    assert rets and all(insn_at(x["file_offset"]) == "ret" for x in rets)
    create = r["goroutine_create"]
    assert create["kind"] == "runqput_call" and insn_at(create["file_offset"]).startswith("call")


def test_inspect_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    path = gobuild.build("spawner", gobuild.TOOLCHAINS[-1], "stripped")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Go version      go1." in out
    assert "stripped        yes" in out and "symbols from pclntab" in out
    assert "g offsets (table)" in out
    assert "runtime.goexit1" in out and "(emulated)" in out


def test_symbolize_go_statement(toolchain: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A `go` statement's PC (the return address of its call to newproc) names the
    line of the statement, stripped or not."""
    fname, line = gobuild.marker_line("spawner", "spawn-worker")
    for variant in ("default", "stripped"):
        path = gobuild.build("spawner", toolchain, variant)
        r = inspect_json(capsys, str(path))
        newproc = r["probes"]["runtime.newproc"]["address"]
        from goleash.gobin.binary import GoBinary
        from goleash.gobin.pclntab import Pclntab

        with GoBinary(path) as b:
            spawn = Pclntab.from_binary(b).func_by_name("main.spawn")
            assert spawn is not None
            code = b.read(spawn.entry, spawn.end - spawn.entry)
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        calls = [
            i.address + i.size
            for i in md.disasm(code, spawn.entry)
            if i.mnemonic == "call" and i.op_str == hex(newproc)
        ]
        assert len(calls) == 1
        assert main(["symbolize", str(path), hex(calls[0] - 1), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["function"] == "main.spawn"
        assert row["file"].endswith(fname) and row["line"] == line


def test_inspect_running_pie_process(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("reading another process's maps needs root")
    path = gobuild.build("spawner", gobuild.TOOLCHAINS[-1], "pie")
    p = subprocess.Popen([str(path), "-wait"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().startswith("sum")
        r = inspect_json(capsys, "--pid", str(p.pid))
        assert r["pid"] == p.pid and r["pie"] is True
        bias = r["load_bias"]
        assert bias and bias % 4096 == 0
        # The runtime address of goexit1 (link-time + bias) lies in an executable
        # mapping of the process's own binary.
        addr = r["probes"]["runtime.goexit1"]["address"] + bias
        with open(f"/proc/{p.pid}/maps") as maps:
            spans = [
                (int(a, 16), int(b, 16))
                for line in maps
                if "x" in line.split()[1] and line.rstrip().endswith("spawner")
                for a, b in [line.split()[0].split("-")]
            ]
        assert any(lo <= addr < hi for lo, hi in spans)
    finally:
        p.kill()
        p.wait()


# --- bad input: a clear message, exit code 2, no traceback ------------------------------


def run_cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "goleash.cli", *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def expect_error(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def patched_copy(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    data = src.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 1
    dst.write_bytes(data.replace(old, new))
    dst.chmod(0o755)
    return dst


def test_not_an_elf(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello, this is not a program\n" * 10)
    expect_error(run_cli("inspect", str(f)), "not an ELF")


def test_elf_but_not_go() -> None:
    expect_error(run_cli("inspect", shutil.which("true") or "/bin/true"), "not a Go binary")


def test_missing_file(tmp_path: Path) -> None:
    expect_error(run_cli("inspect", str(tmp_path / "nope")), "no such file")


def test_go_before_register_abi(tmp_path: Path) -> None:
    src = gobuild.build("spawner", "1.22.10", "default")
    old = patched_copy(src, tmp_path / "old", b"go1.22.10", b"go1.16.10")
    expect_error(run_cli("inspect", str(old)), "1.17")


def test_stripped_with_unknown_version(tmp_path: Path) -> None:
    src = gobuild.build("spawner", "1.22.10", "stripped")
    future = patched_copy(src, tmp_path / "future", b"go1.22.10", b"go1.99.10")
    expect_error(run_cli("inspect", str(future)), "go1.99", "offsets")


@pytest.mark.parametrize(
    "command", [("inspect",), ("trace", "--duration", "1"), ("panics", "--duration", "1")]
)
def test_no_such_pid(command: tuple[str, ...]) -> None:
    expect_error(run_cli(*command, "--pid", "4000000"), "4000000", "no such process")


def test_pid_that_exited() -> None:
    """A zombie: its /proc entry exists, its executable is gone."""
    p = subprocess.Popen(["sleep", "0"])
    import time

    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        expect_error(run_cli("inspect", "--pid", str(p.pid)), str(p.pid))
    finally:
        p.wait()


def test_no_permission() -> None:
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root to run as another user")
    readable = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import goleash.cli"],
        cwd=REPO,
        capture_output=True,
    )
    if readable.returncode != 0:
        pytest.skip("user nobody cannot read this checkout, so cannot run goleash at all")
    path = gobuild.build("spawner", gobuild.TOOLCHAINS[-1], "default")
    p = subprocess.Popen([str(path), "-wait"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline()
        expect_error(run_cli("inspect", "--pid", str(p.pid), user="nobody"), "permission")
    finally:
        p.kill()
        p.wait()


def test_path_and_pid_together() -> None:
    expect_error(run_cli("inspect", "/bin/true", "--pid", "1"), "exactly one")
