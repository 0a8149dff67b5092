"""What one traced process's part of the goroutines program is: the layout a hit
reads (a gr_procs row) and the records a walk of the shared tables hands back."""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass

from goleash.errors import GoleashError
from goleash.gobin.offsets import RuntimeOffsets

SPAN_WORDS = 32  # GR_SPAN_WORDS: one read of runtime.g covers at most 256 bytes
NO_FIELD = 0xFF  # GR_NO_FIELD


class ProbeAttachError(GoleashError):
    """BCC could not compile or attach the goroutine probes."""


# Slots compared at once against zeros when looking for occupied ones (48 KiB).
SCAN_CHUNK_SLOTS = 1024
# The first words of struct live_slot (bpf/goleash.h): goid, pid, gen.
SLOT_HEAD = struct.Struct("<QII")


def live_slots_for(max_live: int) -> int:
    """Slots of the direct-mapped live array: the largest power of two <= max_live
    (a mask, not a division, picks the slot)."""
    return 1 << (max(max_live, 1).bit_length() - 1)


@dataclass(frozen=True)
class ProcessLayout:
    """Where one process's runtime.g keeps what a hit reads: one read of span_bytes
    at span_start, and which 8-byte word of it is which field."""

    span_start: int
    span_bytes: int
    w_goid: int
    w_gopc: int
    w_startpc: int
    w_parent: int  # NO_FIELD before Go 1.21
    g_goid: int
    g_m: int
    m_curg: int


def process_layout(off: RuntimeOffsets) -> ProcessLayout:
    # One bpf_probe_read_user covers every g field a hit needs: a read costs the
    # same for 8 or 160 bytes, so fewer reads is what makes a hit cheaper.
    fields = [off.g_goid, off.g_gopc, off.g_startpc]
    if off.g_parent_goid is not None:
        fields.append(off.g_parent_goid)
    start, end = min(fields), max(fields) + 8
    if end - start > SPAN_WORDS * 8 or any((f - start) % 8 for f in fields):
        raise ProbeAttachError(
            f"runtime.g fields goid/gopc/startpc/parentGoid span {end - start} bytes "
            f"(at most {SPAN_WORDS * 8}, 8-byte aligned, fit one read): this Go release's "
            "layout needs a probe update"
        )
    if start > 0xFFFF:
        raise ProbeAttachError(f"runtime.g.goid at offset {start}: not a runtime.g layout")
    return ProcessLayout(
        span_start=start,
        span_bytes=end - start,
        w_goid=(off.g_goid - start) // 8,
        w_gopc=(off.g_gopc - start) // 8,
        w_startpc=(off.g_startpc - start) // 8,
        w_parent=NO_FIELD if off.g_parent_goid is None else (off.g_parent_goid - start) // 8,
        g_goid=off.g_goid,
        g_m=off.g_m,
        m_curg=off.m_curg,
    )


@dataclass(frozen=True)
class SiteCounts:
    """Kernel-side counts of one creation site since attach."""

    gopc: int
    startpc: int
    created: int
    exited: int
    exited_unseen: int
    lifetime_sum_ns: int
    lifetime_log2: tuple[int, ...]


@dataclass(frozen=True)
class LiveGoroutine:
    """A goroutine born while attached and not yet exited."""

    goid: int
    parent_goid: int
    gopc: int
    startpc: int
    created_ns: int
    stack_id: int


@dataclass
class ProcessTables:
    """One process's part of a walk of the shared tables (runtime PCs)."""

    counters: dict[str, int]
    sites: dict[tuple[int, int], SiteCounts]
    live: dict[int, LiveGoroutine]


def occupied_slots(
    array: mmap.mmap | bytes, record: struct.Struct, slots: int
) -> list[tuple[int, ...]]:
    """(index, *fields) of every slot of ARRAY (SLOTS records of RECORD, the first
    field an 8-byte goid, 0 when empty) that is occupied. The array is mostly empty
    (its size is the node's capacity): a chunk of empty slots costs one comparison
    in C instead of a Python object per slot."""
    size = record.size
    chunk_bytes = SCAN_CHUNK_SLOTS * size
    zero = bytes(chunk_bytes)
    out: list[tuple[int, ...]] = []
    for base in range(0, slots, SCAN_CHUNK_SLOTS):
        data = array[base * size : min(slots, base + SCAN_CHUNK_SLOTS) * size]
        if data == zero[: len(data)]:
            continue
        words = memoryview(data).cast("Q")
        goids = words[:: size // 8].tolist()
        words.release()
        # A slot freed and reused while copying shows a goid with another's info for
        # one reading at most; a chunk is one memcpy, so that window is tiny.
        out.extend(
            (base + i, *record.unpack_from(data, i * size))
            for i in itertools.compress(range(len(goids)), goids)  # nonzero, in C
        )
    return out
