"""Where the function-latency and panic probes go: chosen by disassembly (gobin).

An entry probe sits after the stack-growth check on the cheapest once-per-call
instruction that still holds R14 (the calling g); a return probe on every RET, or on
an emulated NOP standing in for a RET where the control flow allows it (see
funclat.py for what each costs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from goleash.errors import GoleashError
from goleash.gobin.disasm import ProbeSite, disassemble, emulated_entry_site, function_probes
from goleash.probes.funcs import TracedFunction
from goleash.probes.target import GoProcess


class FuncProbeError(GoleashError):
    """BCC could not compile or attach the function-latency probes."""


@dataclass(frozen=True)
class FuncSites:
    symbol: str
    entry: ProbeSite
    sp_adj: int  # bytes the function lowered SP before `entry` (0 at its first instruction)
    rets: tuple[ProbeSite, ...]  # the RETs themselves (single-stepped)
    tail_calls: int  # exits by `jmp` that no RET probe sees
    # Emulated stand-ins for some RETs: a NOP right before a RET that nothing jumps to
    # (SP is already what the RET sees). Go leaves one before ~3% of its RETs.
    ret_nops: tuple[ProbeSite, ...] = ()


def _sp_lowered(binary: Any, start: ProbeSite, site: ProbeSite) -> int | None:
    """How far SP moved down between two sites on a straight line, or None if some
    instruction there changes SP in a way not followed."""
    if site.vaddr == start.vaddr:
        return 0
    delta = 0
    for ins in disassemble(binary, start.vaddr, site.vaddr - start.vaddr):
        if "rsp" not in ins.writes:
            continue
        ops = ins.op_str.split(", ")
        if ins.mnemonic == "push":
            delta += 8
        elif ins.mnemonic == "pop":
            delta -= 8
        elif ins.mnemonic in ("sub", "add") and ops[0] == "rsp" and len(ops) == 2:
            try:
                n = int(ops[1], 0)
            except ValueError:
                return None
            delta += n if ins.mnemonic == "sub" else -n
        else:
            return None
    return delta


def function_sites(proc: GoProcess, fn: TracedFunction) -> FuncSites:
    """Entry after the stack check on the cheapest once-per-call instruction that still
    has R14 (on Go 1.19 that is past `sub rsp`, hence sp_adj), and every RET."""
    fp = function_probes(proc.binary, fn.symbol, fn.addr, fn.size)
    entry, adj = fp.entry_probe, _sp_lowered(proc.binary, fp.after_check, fp.entry_probe)
    if adj is None:
        entry, adj = fp.after_check, 0
    if not fp.rets:
        raise FuncProbeError(
            f"{fn.symbol} has no RET instruction (it never returns, or leaves only by tail "
            "calls): there is nothing to time"
        )
    rets, nops = _return_sites(proc, fn, fp.rets)
    return FuncSites(fn.symbol, entry, adj, rets, len(fp.tail_calls), nops)


def _return_sites(
    proc: GoProcess, fn: TracedFunction, rets: Sequence[ProbeSite]
) -> tuple[tuple[ProbeSite, ...], tuple[ProbeSite, ...]]:
    """Split the RETs into those probed where they are and emulated NOPs standing in
    for the others. A NOP stands in only on a straight line: the RET is no jump target,
    and the function has no indirect jump (a jump table could land on the RET)."""
    insns = disassemble(proc.binary, fn.addr, fn.size)
    if any(i.mnemonic == "jmp" and i.target is None for i in insns):
        return tuple(rets), ()
    targets = {i.target for i in insns if i.target is not None}
    before = {b.address: a for a, b in zip(insns, insns[1:], strict=False)}
    stepped: list[ProbeSite] = []
    nops: list[ProbeSite] = []
    for r in rets:
        prev = before.get(r.vaddr)
        if (
            prev is not None
            and prev.mnemonic == "nop"
            and prev.is_emulated
            and r.vaddr not in targets  # a jump to the NOP still passes it: fine
        ):
            nops.append(
                ProbeSite(
                    r.symbol,
                    prev.address,
                    proc.binary.vaddr_to_offset(prev.address),
                    prev.text,
                    True,
                )
            )
        else:
            stepped.append(r)
    return tuple(stepped), tuple(nops)


def runtime_site(proc: GoProcess, name: str, keep: tuple[str, ...]) -> tuple[ProbeSite, int]:
    """A runtime function's emulated entry site that still holds the registers in `keep`,
    and how far SP was lowered before it (else the site right after the stack check)."""
    found = proc.symbols.require(name)
    fp = function_probes(proc.binary, name, *found)
    site = emulated_entry_site(proc.binary, name, *found, keep=keep)
    adj = _sp_lowered(proc.binary, fp.after_check, site)
    if adj is None:
        return fp.after_check, 0
    return site, adj
