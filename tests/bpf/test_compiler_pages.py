"""After a compile the agent drops LLVM's and clang's clean pages (node/compilerpages.py):
they leave its resident set, the libraries' written (relocated) pages are kept, and
the next compile still works."""

from __future__ import annotations

from pathlib import Path

import pytest

from goleash.node.compilerpages import Mapping, drop_compiler_pages, droppable, parse_smaps

pytestmark = pytest.mark.root


def _compiler_rss_kb() -> int:
    return sum(
        rss
        for m, rss in _rss_by_mapping(Path("/proc/self/smaps").read_text())
        if droppable(Mapping(m.start, m.length, m.perms, m.path, 0))
    )


def _rss_by_mapping(text: str) -> list[tuple[Mapping, int]]:
    out, maps = [], iter(parse_smaps(text))
    for line in text.splitlines():
        if line.startswith("Rss:"):
            out.append((next(maps), int(line.split()[1])))
    return out


def test_compiler_pages_dropped_after_a_compile_and_the_next_compile_works() -> None:
    from bcc import BPF

    first = BPF(text=b"int one(void *ctx) { return 0; }")
    try:
        before = _compiler_rss_kb()
        assert before > 20_000, "LLVM is not resident after a compile?"
        written = {
            (m.start, m.anonymous_kb)
            for m in parse_smaps(Path("/proc/self/smaps").read_text())
            if m.anonymous_kb > 0 and "LLVM" in m.path
        }
        assert drop_compiler_pages() > 0
        assert _compiler_rss_kb() < before / 2
        after = {
            (m.start, m.anonymous_kb)
            for m in parse_smaps(Path("/proc/self/smaps").read_text())
            if m.anonymous_kb > 0 and "LLVM" in m.path
        }
        assert after == written  # relocated pages untouched
        second = BPF(text=b"int two(void *ctx) { return 1; }")
        second.cleanup()
    finally:
        first.cleanup()
