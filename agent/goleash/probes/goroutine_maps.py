"""The goroutines program's maps as Python sees them: ctypes views of bpf/goleash.h.

goroutines.bpf.c is loaded from an image (bpfimage.py), not through BCC's BPF object,
so nothing derives these types from clang's output at run time: they are written
here, in the header's field order, and tests/bpf/test_layouts.py holds each to the
header as clang lays it out (names, offsets, sizes, signedness). bpfload also checks
each map's key and value sizes against them when the program is opened.
"""

from __future__ import annotations

import ctypes
import struct

LIFETIME_SLOTS = 48
COUNTER_NAMES = (
    "create_hits",
    "exit_hits",
    "newproc_hits",
    "live_table_full",
    "site_table_full",
    "read_faults",
    "stack_faults",
)


class _GoroutineKey(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("goid", ctypes.c_uint64)]


class _SiteKey(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("gopc", ctypes.c_uint64),
        ("startpc", ctypes.c_uint64),
    ]


class _GoroutineInfo(ctypes.Structure):
    _fields_ = [
        ("parent_goid", ctypes.c_uint64),
        ("gopc", ctypes.c_uint64),
        ("startpc", ctypes.c_uint64),
        ("created_ns", ctypes.c_uint64),
        ("stack_id", ctypes.c_int64),
    ]


class _LiveSlot(ctypes.Structure):
    _fields_ = [
        ("goid", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("info", _GoroutineInfo),
    ]


class _PidSlot(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("row", ctypes.c_uint32)]


class _Proc(ctypes.Structure):  # struct gr_proc
    _fields_ = [
        ("gen", ctypes.c_uint32),
        ("span_start", ctypes.c_uint16),
        ("span_bytes", ctypes.c_uint16),
        ("w_goid", ctypes.c_uint8),
        ("w_gopc", ctypes.c_uint8),
        ("w_startpc", ctypes.c_uint8),
        ("w_parent", ctypes.c_uint8),
        ("g_goid", ctypes.c_uint32),
        ("g_m", ctypes.c_uint32),
        ("m_curg", ctypes.c_uint32),
        ("counters", ctypes.c_uint64 * len(COUNTER_NAMES)),  # GR_CNT_MAX
    ]


class _Usage(ctypes.Structure):  # struct gr_usage
    _fields_ = [
        ("live_in_hash", ctypes.c_int64),
        ("sites", ctypes.c_int64),
        ("max_live_in_hash", ctypes.c_int64),
        ("max_sites", ctypes.c_int64),
    ]


class _SiteStats(ctypes.Structure):
    _fields_ = [
        ("created", ctypes.c_uint64),
        ("exited", ctypes.c_uint64),
        ("exited_unseen", ctypes.c_uint64),
        ("lifetime_sum_ns", ctypes.c_uint64),
        ("lifetime_log2", ctypes.c_uint64 * LIFETIME_SLOTS),
    ]


class _SiteCacheEntry(ctypes.Structure):
    _fields_ = [
        ("gopc", ctypes.c_uint64),
        ("startpc", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("created", ctypes.c_uint64),
    ]


STACK_DEPTH = 127  # BCC's BPF_MAX_STACK_DEPTH: a creator_stacks value's addresses
_u32 = ctypes.c_uint32
# Every map user space touches: name -> (key, value) views; a per-CPU map's value is
# one CPU's (bpfload reads all CPUs). zero_site and pending_stack are the program's.
_MAPS = {
    "gr_pid_slots": (_u32, _PidSlot),
    "gr_pid_rows": (_u32, _u32),
    "gr_procs": (_u32, _Proc),
    "gr_modes": (_u32, _u32),
    "gr_freed": (_u32, ctypes.c_int64),
    "gr_read_ns": (_u32, ctypes.c_uint64),
    "gr_usage": (_u32, _Usage),
    "live_slots": (_u32, _LiveSlot),
    "live_goroutines": (_GoroutineKey, _GoroutineInfo),
    "site_stats": (_SiteKey, _SiteStats),
    "site_cache": (_u32, _SiteCacheEntry),
}
_STACK_MAP = ("creator_stacks", _u32, ctypes.c_uint64 * STACK_DEPTH)

# struct live_slot in bpf/goleash.h: goid, pid, gen, then struct goroutine_info.
_LIVE_SLOT = struct.Struct("<QIIQQQQq")
_SLOT_WRITING = (1 << 64) - 1  # empty slots have goid 0
_SITE_WORDS = 4 + LIFETIME_SLOTS  # struct site_stats in u64 words
