"""Finding the occupied slots of the live-goroutine array (probes/goroutine_records.py):
the same slots a slot-by-slot scan finds, wherever they sit among the empty ones."""

from __future__ import annotations

import random
import struct

import pytest

from goleash.probes.goroutine_records import (
    SCAN_CHUNK_SLOTS,
    occupied_slots,
    records_in_slots,
    slot_index,
    stale_slots,
)

SLOT = struct.Struct("<QIIQQQQq")  # struct live_slot in bpf/goleash.h


def array_with(slots: int, records: dict[int, tuple[int, ...]]) -> bytearray:
    data = bytearray(slots * SLOT.size)
    for idx, rec in records.items():
        SLOT.pack_into(data, idx * SLOT.size, *rec)
    return data


def slot_by_slot(data: bytes, slots: int) -> list[tuple[int, ...]]:
    out = []
    for i in range(slots):
        rec = SLOT.unpack_from(data, i * SLOT.size)
        if rec[0]:
            out.append((i, *rec))
    return out


@pytest.mark.parametrize("slots", [1, 64, SCAN_CHUNK_SLOTS, 4 * SCAN_CHUNK_SLOTS + 64])
def test_finds_what_a_slot_by_slot_scan_finds(slots: int) -> None:
    rng = random.Random(slots)
    edges = {0, slots - 1, SCAN_CHUNK_SLOTS - 1, SCAN_CHUNK_SLOTS, 2 * SCAN_CHUNK_SLOTS + 1}
    picked = {i for i in edges if i < slots} | {rng.randrange(slots) for _ in range(20)}
    records = {
        i: (rng.choice([1, 7, (1 << 64) - 1, rng.getrandbits(64) | 1]), 100 + i, 3, 1, 2, 3, 4, -1)
        for i in picked
    }
    # A slot whose goid is 0 is empty whatever its other words hold (freed records).
    empty_but_dirty = next(i for i in range(slots) if i not in picked) if slots > 1 else None
    data = array_with(slots, records)
    if empty_but_dirty is not None:
        SLOT.pack_into(data, empty_but_dirty * SLOT.size, 0, 99, 9, 9, 9, 9, 9, 9)
    found = occupied_slots(bytes(data), SLOT, slots)
    assert found == slot_by_slot(bytes(data), slots)
    assert [f[0] for f in found] == sorted(picked)


def test_an_empty_array_has_no_slots() -> None:
    assert occupied_slots(bytes(8 * SCAN_CHUNK_SLOTS * SLOT.size), SLOT, 8 * SCAN_CHUNK_SLOTS) == []


WRITING = (1 << 64) - 1


def c_slot_of(pid: int, goid: int, slots: int) -> int:
    """slot_of() in bpf/goroutines.bpf.c with C's unsigned widths spelled out:
    (u32)(goid + (u32)(pid * 2654435761u)) & (LIVE_SLOTS - 1)."""
    spread = (pid * 2654435761) & 0xFFFFFFFF
    return ((goid + spread) & 0xFFFFFFFFFFFFFFFF) & 0xFFFFFFFF & (slots - 1)


@pytest.mark.parametrize("slots", [1, 1024, 131072])
def test_slot_index_is_the_programs(slots: int) -> None:
    rng = random.Random(slots)
    for _ in range(2000):
        pid, goid = (
            rng.randrange(1, 1 << 22),
            rng.choice([rng.randrange(1, 1 << 20), rng.getrandbits(63)]),
        )
        assert slot_index(pid, goid, slots) == c_slot_of(pid, goid, slots)


def test_records_are_found_in_their_own_slot_only() -> None:
    slots, pid, gen = 256, 4242, 7
    data = array_with(slots, {})
    mine = {
        goid: (goid, pid, gen, 1, 0x1000 + goid, 0x2000, 5_000 + goid, -1) for goid in (1, 2, 300)
    }
    for goid, rec in mine.items():
        SLOT.pack_into(data, slot_index(pid, goid, slots) * SLOT.size, *rec)
    # Goroutine 9's slot holds goid 9 of another process, goroutine 10's an older
    # registration of this pid, goroutine 11's a birth being written.
    for goid, owner, g in ((9, pid + 1, gen), (10, pid, gen - 1), (11, pid, gen)):
        rec = (WRITING if goid == 11 else goid, owner, g, 1, 2, 3, 4, -1)
        SLOT.pack_into(data, slot_index(pid, goid, slots) * SLOT.size, *rec)
    found, missing = records_in_slots(bytes(data), slots, pid, gen, [1, 2, 300, 9, 10, 11, 12])
    assert found == {goid: rec[3:] for goid, rec in mine.items()}
    assert missing == [9, 10, 11, 12]


def stale_by_slot(data: bytes, slots: int, pid: int, gen: int, live: set[int], before: int) -> list:
    out = []
    for i in range(slots):
        goid, p, g, _parent, _gopc, _startpc, created, _sid = SLOT.unpack_from(data, i * SLOT.size)
        if (
            goid
            and goid != WRITING
            and (p, g) == (pid, gen)
            and created < before
            and goid not in live
        ):
            out.append((i, goid))
    return out


@pytest.mark.parametrize("slots", [64, 4 * SCAN_CHUNK_SLOTS + 64])
def test_stale_slots_are_what_a_slot_by_slot_scan_judges(slots: int) -> None:
    rng = random.Random(slots)
    pid, gen, before = 77, 3, 1_000_000
    records = {}
    for i in rng.sample(range(slots), min(slots, 600)):
        goid = rng.choice([rng.randrange(1, 5000), WRITING])
        owner = rng.choice([(pid, gen), (pid, gen + 1), (pid + 1, gen)])
        created = rng.choice([before - 1, before, before + 1, rng.randrange(1 << 40)])
        records[i] = (goid, *owner, 1, 2, 3, created, -1)
    data = bytes(array_with(slots, records))
    live = {rng.randrange(1, 5000) for _ in range(300)}
    got = stale_slots(data, slots, pid, gen, live, before)
    assert got == stale_by_slot(data, slots, pid, gen, live, before)
    assert got, "the random table has stale slots"
