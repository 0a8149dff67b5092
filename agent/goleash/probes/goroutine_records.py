"""What one traced process's part of the goroutines program is: the layout a hit
reads (a gr_procs row) and the records a walk of the shared tables hands back."""

from __future__ import annotations

import itertools
import mmap
import operator
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from goleash.errors import GoleashError
from goleash.gobin.offsets import RuntimeOffsets
from goleash.probes.goroutine_maps import _LIVE_SLOT, _SLOT_WRITING

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


# Knuth's multiplicative constant: the program's slot_of() spreads processes with it.
_PID_SPREAD = 2654435761
# struct live_slot in u64 words: goid, pid and gen (one word), then goroutine_info's
# parent_goid, gopc, startpc, created_ns, stack_id.
_SLOT_WORDS = _LIVE_SLOT.size // 8
_CREATED_WORD = 5


def slot_index(pid: int, goid: int, slots: int) -> int:
    """The slot of live_slots where the program puts PID's goroutine GOID (slot_of in
    bpf/goroutines.bpf.c: the low bits of goid + pid * K, in unsigned arithmetic)."""
    return (goid + pid * _PID_SPREAD) & (slots - 1)


def records_in_slots(
    array: mmap.mmap | bytes, slots: int, pid: int, gen: int, goids: Iterable[int]
) -> tuple[dict[int, tuple[int, ...]], list[int]]:
    """PID's (registration GEN) records of GOIDS in live_slots ARRAY, each read from
    its own slot: (goid -> the goroutine_info fields, goids not in their slot). One
    small read per goid, whatever else the array holds: dead goroutines' records are
    never looked at."""
    record, size = _LIVE_SLOT, _LIVE_SLOT.size
    found: dict[int, tuple[int, ...]] = {}
    missing: list[int] = []
    for goid in goids:
        fields = record.unpack_from(array, slot_index(pid, goid, slots) * size)
        if fields[0] == goid and fields[1] == pid and fields[2] == gen:
            found[goid] = fields[3:]
        else:
            missing.append(goid)
    return found, missing


def stale_slots(
    array: mmap.mmap | bytes,
    slots: int,
    pid: int,
    gen: int,
    live: set[int] | frozenset[int],
    born_before_ns: int,
) -> list[tuple[int, int]]:
    """(index, goid) of PID's slots in live_slots ARRAY whose goroutine is not in LIVE
    and was born before BORN_BEFORE_NS (a later birth may be live but missing from
    the inventory LIVE came from). Only the goid, owner and birth-time words of
    occupied chunks are looked at, each test a C-level map over a chunk's words: a
    table of 100k dead goroutines' records costs ~20 ms, not a record object each."""
    size, words_per = _LIVE_SLOT.size, _SLOT_WORDS
    owner = pid | (gen << 32)  # the pid and gen u32s as one little-endian u64
    chunk_bytes = SCAN_CHUNK_SLOTS * size
    zero = bytes(chunk_bytes)
    out: list[tuple[int, int]] = []
    for base in range(0, slots, SCAN_CHUNK_SLOTS):
        data = array[base * size : min(slots, base + SCAN_CHUNK_SLOTS) * size]
        if data == zero[: len(data)]:
            continue
        words = memoryview(data).cast("Q")
        goids = words[::words_per].tolist()
        owners = words[1::words_per].tolist()
        births = words[_CREATED_WORD::words_per].tolist()
        words.release()
        ok = map(operator.and_, map(owner.__eq__, owners), map(born_before_ns.__gt__, births))
        ok = map(operator.and_, ok, map(operator.not_, map(live.__contains__, goids)))
        ok = map(operator.and_, ok, map(_SLOT_WRITING.__ne__, goids))
        stale = list(map(operator.and_, ok, map(bool, goids)))
        out.extend(
            zip(
                itertools.compress(range(base, base + len(goids)), stale),
                itertools.compress(goids, stale),
                strict=True,
            )
        )
    return out


def free_slots(array: mmap.mmap, stale: list[tuple[int, int]], pid: int, gen: int) -> int:
    """Empty the STALE slots (index, goid) of PID's registration GEN in live_slots
    ARRAY (writable) that still hold what was judged: the program may have put
    another birth in one since. Returns how many were emptied."""
    owner = pid | (gen << 32)
    words = memoryview(array).cast("Q")
    freed = 0
    try:
        for idx, goid in stale:
            w = idx * _SLOT_WORDS
            if words[w] == goid and words[w + 1] == owner:
                words[w] = 0  # LIVE_SLOT_EMPTY: one aligned 8-byte store
                freed += 1
    finally:
        words.release()
    return freed
