"""Finding the occupied slots of the live-goroutine array (probes/goroutine_records.py):
the same slots a slot-by-slot scan finds, wherever they sit among the empty ones."""

from __future__ import annotations

import random
import struct

import pytest

from goleash.probes.goroutine_records import SCAN_CHUNK_SLOTS, occupied_slots

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
