"""Which of the agent's mappings node/compilerpages.py may drop: only the compiler
libraries' read-only mappings that hold nothing but the file's bytes."""

from __future__ import annotations

from goleash.node.compilerpages import droppable, parse_smaps


def test_only_clean_read_only_compiler_mappings_qualify() -> None:
    text = (
        "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1\n"
        "Rss:                  64 kB\nAnonymous:             0 kB\n"
        "7f10-7f20 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1\n"
        "Rss:                  64 kB\nAnonymous:             8 kB\n"
        "7f20-7f30 rw-p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1\n"
        "Anonymous:             0 kB\n"
        "7f30-7f40 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "Anonymous:             0 kB\n"
        "7f40-7f50 r-xp 00000000 08:01 3 /usr/lib/llvm-14/lib/libclang-cpp.so.14\n"
        "Rss:                  64 kB\n"  # no Anonymous line: unknown, not touched
        "7f50-7f60 r--p 00000000 08:01 3 /usr/lib/llvm-14/lib/libclang-cpp.so.14\n"
        "Anonymous:             0 kB\n"
    )
    maps = parse_smaps(text)
    assert [m.start for m in maps if droppable(m)] == [0x7F00, 0x7F50]
