#!/usr/bin/env python3
"""Plant known bugs in goleash and check that the tests meant to catch them fail.

Each mutant is a text patch (file, the original snippet, the mutated snippet) and the
pytest selection that must catch it. The patches go into a temporary copy of the tree,
never into the working tree; the copy's tests run against the copy's code (PYTHONPATH
and the BPF sources both come from the copy). A snippet that is not found exactly
once is reported as such and fails the run: a mutant that cannot be planted proves
nothing, so it never counts as caught.

    python scripts/mutants.py                 # every mutant (make mutants)
    python scripts/mutants.py --list
    python scripts/mutants.py --only nop-before-ret-off --only allgs-skips-last
    python scripts/mutants.py --tests-from main   # the suite of another revision
    python scripts/mutants.py --baseline      # also run each selection unmutated

Needs root (the selections attach real probes), the Go toolchains and the venv that
`make setup` prepares. Exit status: 0 when every mutant was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # one mutant's selection; the slowest (policy e2e) take ~1-2 min
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache")

FUNCLAT = "tests/bpf/test_funclat.py"
GOROUTINES = "tests/bpf/test_goroutines.py"
POLICY_AGENT = "tests/e2e/test_policy_agent.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest arguments: paths and -k expressions
    why: str


MUTANTS: tuple[Mutant, ...] = (
    # --- latency: what `goleash latency --json` prints --------------------------------
    Mutant(
        "to-dict-p50-p99-swapped",
        "agent/goleash/probes/funcrecord.py",
        '"p50_ns": ns(0.5),\n            "p90_ns": ns(0.9),\n            "p99_ns": ns(0.99),',
        '"p50_ns": ns(0.99),\n            "p90_ns": ns(0.9),\n            "p99_ns": ns(0.5),',
        (FUNCLAT, "-k", "cli_latency"),
        "FunctionLatency.to_dict prints p99 as p50 and p50 as p99",
    ),
    Mutant(
        "to-dict-p90-p999-swapped",
        "agent/goleash/probes/funcrecord.py",
        '"p90_ns": ns(0.9),\n            "p99_ns": ns(0.99),\n            "p999_ns": ns(0.999),',
        '"p90_ns": ns(0.999),\n            "p99_ns": ns(0.99),\n            "p999_ns": ns(0.9),',
        (FUNCLAT, "-k", "cli_latency"),
        "FunctionLatency.to_dict prints p999 as p90 and p90 as p999",
    ),
    Mutant(
        "nop-before-ret-off",
        "agent/goleash/probes/funcsites.py",
        'and prev.mnemonic == "nop"',
        'and prev.mnemonic == "nop" and False',
        (FUNCLAT, "-k", "nop_before_ret and (go1.19 or go1.27.3)"),
        "a RET is never replaced by the emulated NOP before it",
    ),
    Mutant(
        "entry-sp-adjust-ignored",
        "agent/goleash/probes/funcprog.py",
        "by_addr[s.entry.vaddr + proc.load_bias] = SiteView(fid, 0, s.sp_adj)",
        "by_addr[s.entry.vaddr + proc.load_bias] = SiteView(fid, 0, 0)",
        (FUNCLAT, "-k", "sleep_mixture and go1.19"),
        "the entry probe past `sub rsp` (Go 1.19) computes its stack depth from the wrong SP",
    ),
    Mutant(
        "bpf-latency-halved",
        "bpf/funclat.bpf.c",
        "fl_record(st, fid, now - top->start_ns);",
        "fl_record(st, fid, (now - top->start_ns) / 2);",
        (FUNCLAT, "-k", "sleep_mixture and go1.27.3"),
        "the kernel side records half of each call's duration",
    ),
    Mutant(
        "bpf-stale-not-counted",
        "bpf/funclat.bpf.c",
        "        __sync_fetch_and_add(&st->stale, 1);\n",
        "",
        (FUNCLAT, "-k", "(goexit or recovered_panics) and go1.27.3"),
        "calls unwound by a panic or Goexit vanish without being counted stale",
    ),
    # --- goroutine probes ----------------------------------------------------------------
    Mutant(
        "bpf-parent-from-g0",
        "bpf/goroutines.bpf.c",
        "read_u64(p, &info.parent_goid, curg + p->g_goid);",
        "read_u64(p, &info.parent_goid, ctx->r14 + p->g_goid);",
        (GOROUTINES, "-k", "parents_from_probes and go1.19"),
        "Go 1.19: the parent is read from g0 (the system stack) instead of g0.m.curg",
    ),
    Mutant(
        "bpf-created-counted-twice",
        "bpf/goroutines.bpf.c",
        "st->created++;",
        "st->created += 2;",
        (GOROUTINES, "-k", "counts_exact and go1.27.3 and default"),
        "every goroutine creation counted twice at its site",
    ),
    Mutant(
        "bpf-read-records-kept",
        "bpf/goroutines.bpf.c",
        "return read_ns && s->info.created_ns < *read_ns;",
        "return 0;",
        ("tests/bpf/test_goroutines_walk.py", "-k", "give_way"),
        "a birth never takes the slot of a record another process's tracker has read",
    ),
    Mutant(
        "births-asked-again",
        "agent/goleash/node/births.py",
        "return [g.goid for g in goroutines if g.goid not in known and g.goid not in unrecorded]",
        "return [g.goid for g in goroutines if g.goid not in unrecorded]",
        ("tests/unit/test_births.py",),
        "every interval asks the kernel again for the records it already holds",
    ),
    # --- inventory (process memory) ------------------------------------------------------
    Mutant(
        "allgs-skips-last",
        "agent/goleash/probes/inventory.py",
        'raw = mem.read(ptr, 8 * n)\n    pointers = list(struct.unpack(f"<{n}Q", raw))',
        'raw = mem.read(ptr, 8 * (n - 1))\n    pointers = list(struct.unpack(f"<{n - 1}Q", raw))',
        (GOROUTINES, "-k", "counts_exact and (go1.19 or go1.27.3) and default"),
        "the goroutine-list read skips the last allgs entry",
    ),
    Mutant(
        "wait-reason-off-by-one",
        "agent/goleash/probes/inventory.py",
        "wait_reason = reasons[r] if r < len(reasons)",
        "wait_reason = reasons[r - 1] if r < len(reasons)",
        (GOROUTINES, "-k", "counts_exact and go1.27.3 and default"),
        "wait reasons named from the wrong entry of the runtime's table",
    ),
    # --- orphans -------------------------------------------------------------------------
    Mutant(
        "orphan-parent-alive-ignored",
        "agent/goleash/node/tracker.py",
        "            and parent not in live\n",
        "",
        (GOROUTINES, "-k", "counts_exact and go1.19 and default"),
        "a goroutine whose parent is still alive counts as an orphan (checked on Go 1.19)",
    ),
    Mutant(
        "orphan-parent-alive-ignored-1.27",
        "agent/goleash/node/tracker.py",
        "            and parent not in live\n",
        "",
        (GOROUTINES, "-k", "counts_exact and go1.27.3 and default"),
        "a goroutine whose parent is still alive counts as an orphan (checked on Go 1.27)",
    ),
    # --- policy engine -------------------------------------------------------------------
    Mutant(
        "policy-sustain-ignored",
        "agent/goleash/control/engine_state.py",
        "st.runs[i] >= rule.consecutive",
        "st.runs[i] >= 1",
        (POLICY_AGENT, "-k", "levels_up"),
        "a level fires on the first evaluation over its threshold, not after `consecutive`",
    ),
    Mutant(
        "policy-hysteresis-ignored",
        "agent/goleash/control/rules.py",
        "        return value < self.clear_below\n",
        "        return not self.firing(value)\n",
        (POLICY_AGENT, "-k", "levels_up"),
        "a level clears as soon as the signal is under its threshold (clear_below ignored)",
    ),
    Mutant(
        "policy-hold-ignored",
        "agent/goleash/control/engine.py",
        "if now - st.clear_since < rule.hold:",
        "if False:",
        (POLICY_AGENT, "-k", "levels_up"),
        "recovery does not wait for the hold time",
    ),
    Mutant(
        "policy-blast-radius-off-by-one",
        "agent/goleash/control/engine.py",
        "len(degraded) >= cap",
        "len(degraded) > cap",
        (POLICY_AGENT, "-k", "blast_radius"),
        "one service more than the blast-radius cap is degraded",
    ),
    Mutant(
        "policy-no-data-recovers",
        "agent/goleash/control/engine.py",
        "        if rreading is None:\n"
        "            st.clear_since = None\n"
        '            self._note(rule, svc, st, "no data: holding the degraded state", now)\n'
        "            return None\n"
        "        if not cleared:\n",
        "        if not cleared and rreading is not None:\n",
        ("tests/unit/test_policy_engine.py", "-k", "no_data"),
        "a degraded service whose data stops is recovered on a guess",
    ),
)


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # caught | SURVIVED | NOT PLANTED | NO TESTS | ERROR
    seconds: float
    detail: str = ""


def copy_tree(dest: Path, tests_from: str | None) -> None:
    shutil.copytree(REPO, dest, ignore=IGNORE, symlinks=True)
    if tests_from:
        # The suite of another revision against this tree's code: how many of these
        # bugs that suite caught.
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", tests_from, "tests"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_selection(tree: Path, args: tuple[str, ...], log: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "agent"), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(
                cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, time.monotonic() - t0


def last_lines(log: Path, n: int = 3) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return " | ".join(lines[-n:])


def run_mutant(m: Mutant, tree: Path, logs: Path) -> Outcome:
    target = tree / m.file
    if not target.exists():
        return Outcome(m, "NOT PLANTED", 0.0, f"{m.file} does not exist")
    text = target.read_text()
    n = text.count(m.original)
    if n != 1:
        where = "not found" if n == 0 else f"found {n} times"
        return Outcome(m, "NOT PLANTED", 0.0, f"snippet {where} in {m.file}: update the mutant")
    target.write_text(text.replace(m.original, m.mutated))
    try:
        log = logs / f"{m.name}.log"
        rc, secs = run_selection(tree, m.tests, log)
    finally:
        target.write_text(text)
    if rc == 1:
        return Outcome(m, "caught", secs, last_lines(log, 1))
    if rc == 0:
        return Outcome(m, "SURVIVED", secs, f"the selection passed; log {log}")
    if rc == 5:
        return Outcome(m, "NO TESTS", secs, f"the selection matched no test; log {log}")
    what = "timed out" if rc == -1 else f"pytest exit {rc}"
    return Outcome(m, "ERROR", secs, f"{what}: {last_lines(log)}; log {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME")
    ap.add_argument("--tests-from", metavar="REV", help="take tests/ from this git revision")
    ap.add_argument(
        "--baseline", action="store_true", help="first run each selection on the unmutated copy"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree and logs")
    a = ap.parse_args()

    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    unknown = set(a.only) - {m.name for m in MUTANTS}
    if unknown:
        print(f"mutants: unknown mutant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:34} {m.file}: {m.why}\n{'':34} caught by: {' '.join(m.tests)}")
        return 0
    if os.geteuid() != 0:
        print("mutants: the selections attach BPF probes: run as root", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="goleash-mutants-"))
    tree, logs = work / "tree", work / "logs"
    logs.mkdir()
    copy_tree(tree, a.tests_from)
    print(f"mutants: {len(chosen)} mutant(s) in a copy at {tree}", flush=True)
    failed = False
    try:
        if a.baseline:
            for sel in sorted({m.tests for m in chosen}):
                rc, secs = run_selection(tree, sel, logs / "baseline.log")
                ok = rc == 0
                failed |= not ok
                print(f"  baseline {'ok' if ok else f'FAILS (exit {rc})'} {secs:5.0f}s  "
                      f"{' '.join(sel)}", flush=True)  # fmt: skip
            if failed:
                print("mutants: a selection fails without any mutant: fix that first")
                return 1
        outcomes = []
        for m in chosen:
            o = run_mutant(m, tree, logs)
            outcomes.append(o)
            print(f"  {o.verdict:11} {o.seconds:5.0f}s  {m.name}: {o.detail}", flush=True)
        caught = sum(o.verdict == "caught" for o in outcomes)
        print(f"mutants: {caught} of {len(outcomes)} caught")
        for o in outcomes:
            if o.verdict != "caught":
                print(f"  not caught: {o.mutant.name} ({o.verdict}): {o.mutant.why}")
        return 0 if caught == len(outcomes) else 1
    finally:
        if a.keep:
            print(f"mutants: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
