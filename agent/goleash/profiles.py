"""Goroutine stacks in the formats profiling tools read: pprof protobuf and folded.

- `pprof_goroutine_profile`: a gzipped `profile.proto` message (github.com/google/
  pprof) shaped like Go's own goroutine profile (`/debug/pprof/goroutine`, debug=0):
  sample type `goroutine/count`, one sample per distinct stack with the number of
  goroutines on it, frames innermost first, inlined calls as extra lines of one
  location. `go tool pprof -top`, Parca, Pyroscope and speedscope read it. Each
  sample also carries a `state` label (the wait reason, else the status), so
  `go tool pprof -tagfocus 'state=chan receive'` works.
- `folded_text`: Brendan Gregg's collapsed stacks (`root;...;leaf COUNT`), for
  flamegraph.pl, inferno and speedscope.

The protobuf is written by hand (a few dozen lines, as runtime/pprof's own
protobuf.go does) rather than generated: the profile message is small and stable,
and this keeps a second generated API out of the package. This module imports
neither probes nor control, so the agent side (a process's memory) and the control
plane side (what agents kept) share it.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileFrame:
    function: str
    file: str = ""
    line: int = 0
    address: int = 0  # the PC (link-time); 0 when not known
    inlined: bool = False  # inlined into the next (outer) frame: same PC, one location


@dataclass(frozen=True)
class StackSample:
    """Goroutines sharing one stack. `frames` innermost first, as a traceback."""

    frames: tuple[ProfileFrame, ...]
    count: int = 1
    labels: tuple[tuple[str, str], ...] = ()


def aggregate(samples: Iterable[StackSample]) -> list[StackSample]:
    """One sample per distinct (stack, labels), counts summed, biggest first."""
    out: dict[tuple[tuple[ProfileFrame, ...], tuple[tuple[str, str], ...]], int] = {}
    for s in samples:
        if s.count > 0:
            key = (s.frames, s.labels)
            out[key] = out.get(key, 0) + s.count
    ordered = sorted(out.items(), key=lambda kv: (-kv[1], [f.function for f in kv[0][0]]))
    return [StackSample(frames, n, labels) for (frames, labels), n in ordered]


# --- folded --------------------------------------------------------------------------


def _folded_name(name: str) -> str:
    # ';' separates frames and the last ' ' the count: neither may appear inside one
    return name.replace(";", ":").replace("\n", " ") or "?"


def folded_text(samples: Iterable[StackSample]) -> str:
    """Collapsed stacks, root first, one line per distinct stack: `a;b;c 12`."""
    counts: dict[str, int] = {}
    for s in samples:
        if s.count <= 0 or not s.frames:
            continue
        line = ";".join(_folded_name(f.function) for f in reversed(s.frames))
        counts[line] = counts.get(line, 0) + s.count
    return "".join(f"{k} {v}\n" for k, v in sorted(counts.items()))


# --- pprof protobuf ----------------------------------------------------------------


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # int64 fields: two's complement, as protobuf encodes them
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v) if v else b""


def _bytes(field: int, b: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(b)) + b


def _packed(field: int, values: Sequence[int]) -> bytes:
    return _bytes(field, b"".join(_varint(v) for v in values)) if values else b""


class _Strings:
    """profile.proto's string table: index 0 is the empty string."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {"": 0}

    def __call__(self, s: str) -> int:
        return self.index.setdefault(s, len(self.index))

    def encode(self) -> bytes:
        return b"".join(_bytes(6, s.encode("utf-8", "replace")) for s in self.index)


def _locations(frames: Sequence[ProfileFrame]) -> list[tuple[int, tuple[ProfileFrame, ...]]]:
    """Frames grouped into locations: a PC with the calls inlined at it, innermost
    first (profile.proto: the last line is the caller the others were inlined into)."""
    out: list[tuple[int, tuple[ProfileFrame, ...]]] = []
    pending: list[ProfileFrame] = []
    for f in frames:
        pending.append(f)
        if not f.inlined:
            out.append((f.address, tuple(pending)))
            pending = []
    if pending:  # a trailing inlined frame whose caller is missing (truncated stack)
        out.append((pending[-1].address, tuple(pending)))
    return out


def pprof_goroutine_profile(
    samples: Iterable[StackSample],
    *,
    time_ns: int = 0,
    comments: Sequence[str] = (),
    mapping_file: str = "",
) -> bytes:
    """A gzipped profile.proto goroutine profile of `samples` (aggregated here)."""
    strings = _Strings()
    functions: dict[tuple[str, str], int] = {}
    locations: dict[tuple[int, tuple[tuple[int, int], ...]], int] = {}
    body = bytearray()
    # sample_type and period_type: goroutine/count, period 1, as runtime/pprof writes
    value_type = _int(1, strings("goroutine")) + _int(2, strings("count"))
    body += _bytes(1, value_type)
    func_msgs: list[bytes] = []
    loc_msgs: list[bytes] = []
    for s in aggregate(samples):
        loc_ids = []
        for address, group in _locations(s.frames):
            lines = []
            for f in group:
                fkey = (f.function, f.file)
                fid = functions.get(fkey)
                if fid is None:
                    fid = functions[fkey] = len(functions) + 1
                    name = strings(f.function or "?")
                    func_msgs.append(
                        _int(1, fid) + _int(2, name) + _int(3, name) + _int(4, strings(f.file))
                    )
                lines.append((fid, max(int(f.line), 0)))
            lkey = (address, tuple(lines))
            lid = locations.get(lkey)
            if lid is None:
                lid = locations[lkey] = len(locations) + 1
                msg = _int(1, lid) + _int(2, 1) + _int(3, address)
                for fid, line in lines:
                    msg += _bytes(4, _int(1, fid) + _int(2, line))
                loc_msgs.append(msg)
            loc_ids.append(lid)
        sample = _packed(1, loc_ids) + _packed(2, [s.count])
        for k, v in s.labels:
            sample += _bytes(3, _int(1, strings(k)) + _int(2, strings(v)))
        body += _bytes(2, sample)
    # One mapping that says the locations are already symbolized, so pprof never
    # looks for the binary to symbolize them again.
    mapping = (
        _int(1, 1)
        + _int(3, (1 << 63) - 1)
        + _int(5, strings(mapping_file))
        + _int(7, 1)
        + _int(8, 1)
        + _int(9, 1)
        + _int(10, 1)
    )
    body += _bytes(3, mapping)
    for m in loc_msgs:
        body += _bytes(4, m)
    for m in func_msgs:
        body += _bytes(5, m)
    tail = _int(9, time_ns) + _bytes(11, value_type) + _int(12, 1)
    for c in comments:
        tail += _int(13, strings(c))
    body += strings.encode() + tail
    return gzip.compress(bytes(body), mtime=0)


def samples_from_folded(stacks: Mapping[tuple[str, ...], int]) -> list[StackSample]:
    """Folded stacks (root first) as samples: the policy engine's creation stacks."""
    return [
        StackSample(tuple(ProfileFrame(name) for name in reversed(frames)), n)
        for frames, n in stacks.items()
    ]


# --- the one JSON schema of `goleash dump --json` ------------------------------------

DUMP_SCHEMA = "goleash.dump/v1"


def goroutine_json(
    *,
    goid: int,
    parent_goid: int | None,
    state: str,
    wait_reason: str | None,
    blocked_seconds: float | None,
    age_seconds: float | None,
    age_is_lower_bound: bool,
    start_function: str,
    created_by: str | None,
    go_statement: str | None,
    orphan: bool | None,
    system: bool | None,
    frames: Sequence[ProfileFrame],
    stack_complete: bool | None,
    stack_note: str | None,
    service: str | None,
    pid: int,
    agent_id: str | None,
) -> dict[str, object]:
    """One goroutine of `dump --json`, the same keys and types whether it was read
    from a process's memory or from what the agents kept (README: "dump --json").
    Unknown values are null, never a 0 or "" that could pass for a measurement."""
    return {
        "goid": int(goid),
        "parent_goid": int(parent_goid) if parent_goid else None,
        "state": state,
        "wait_reason": wait_reason or None,
        "blocked_seconds": None if blocked_seconds is None else round(blocked_seconds, 3),
        "age_seconds": None if age_seconds is None else round(age_seconds, 3),
        "age_is_lower_bound": bool(age_is_lower_bound),
        "start_function": start_function,
        "created_by": created_by or None,
        "go_statement": go_statement or None,
        "orphan": orphan,
        "system": system,
        "frames": [
            {
                "function": f.function,
                "file": f.file,
                "line": int(f.line),
                "pc": int(f.address),
                "inlined": bool(f.inlined),
            }
            for f in frames
        ],
        "stack_complete": stack_complete,
        "stack_note": stack_note or None,
        "service": service or None,
        "pid": int(pid),
        "agent_id": agent_id or None,
    }
