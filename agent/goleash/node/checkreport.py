"""`goleash check`'s report: what the user gets (leaks grouped by test and creation
site, the processes followed), what it leaves out (the ignore list, the baseline) and
how it is shown (text, --json, JUnit XML)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from goleash.errors import GoleashError

MAX_STACK_FRAMES = 32

# --- what the user gets --------------------------------------------------------------


class CheckUsageError(GoleashError):
    """Bad arguments or ignore/baseline files for `goleash check`."""


# --- ignore list and baseline ------------------------------------------------------------


@dataclass
class IgnoreList:
    """Like goleak's options: a top function, a `go` statement or a started function."""

    top: set[str] = field(default_factory=set)
    sites: set[str] = field(default_factory=set)  # "file.go:42" (suffix of the path)
    functions: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: str) -> IgnoreList:
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise CheckUsageError(f"cannot read ignore file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CheckUsageError(f"{path}: not YAML: {exc}") from None
        entries = doc.get("ignore") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise CheckUsageError(
                f"{path}: expected `ignore:` with a list of {{top: FUNC}}, {{site: FILE:LINE}} "
                "or {function: FUNC}"
            )
        out = cls()
        for e in entries:
            if not isinstance(e, dict) or len(e) != 1:
                raise CheckUsageError(f"{path}: bad ignore entry {e!r}")
            ((kind, value),) = e.items()
            if not isinstance(value, str) or not value:
                raise CheckUsageError(f"{path}: bad ignore entry {e!r}")
            if kind == "top":
                out.top.add(value)
            elif kind == "site":
                out.sites.add(value)
            elif kind == "function":
                out.functions.add(value)
            else:
                raise CheckUsageError(f"{path}: unknown ignore kind {kind!r} (top, site, function)")
        return out

    def matches(self, function: str, go_statement: str, stack: list[str]) -> bool:
        if function in self.functions:
            return True
        if any(go_statement == s or go_statement.endswith("/" + s) for s in self.sites):
            return True
        top = next((f.split(" ")[0] for f in stack if not f.startswith("runtime.")), None)
        return top is not None and top in self.top


def load_baseline(path: str) -> set[tuple[str, str, str, str]]:
    import json

    try:
        doc = json.loads(Path(path).read_text())
        return {
            (lk["package"], lk["test"], lk["function"], lk["created_by"]) for lk in doc["leaks"]
        }
    except OSError as exc:
        raise CheckUsageError(f"cannot read baseline {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckUsageError(
            f"{path}: not a `goleash check --json` report (no leaks list)"
        ) from None


@dataclass
class Leak:
    """Goroutines of one creation site left blocked by one test (or at one exit)."""

    package: str  # Go package of the test ("" for an exit leak outside any test)
    test: str  # "TestFoo", "TestFoo/func1" (a subtest, named by its function); "" none
    binary: str  # the executable, as the process saw it
    function: str  # the function the goroutine started with
    go_statement: str  # file:line of the `go` statement
    created_by: str  # function holding the `go` statement
    count: int
    wait_reason: str  # the most common among them
    blocked_s: float | None  # longest known wait (runtime's lazy g.waitsince)
    after_test_s: float | None  # how long after its test ended it was still there
    stack: list[str]  # one goroutine's frames, "function file:line"
    age_s: float | None = None  # oldest of them, since its creation
    known: bool = False  # in the --baseline report: does not fail the check

    @property
    def key(self) -> tuple[str, str, str, str]:
        # Line-free so a baseline survives edits above the go statement.
        return (self.package, self.test, self.function, self.created_by)

    def headline(self) -> str:
        who = f"{self.test} leaked" if self.test else "at exit, outside any test:"
        n = f"{self.count} goroutine" + ("s" if self.count != 1 else "")
        site = (
            Path(self.go_statement.split(":")[0]).name + ":" + self.go_statement.rsplit(":", 1)[-1]
        )
        text = f"{who} {n} created at {site} ({_short(self.function)})"
        if self.wait_reason == "never ran":
            text += ", never scheduled before the process exited"
        elif self.wait_reason:
            text += f", blocked in {self.wait_reason}"
            if self.blocked_s is not None:
                text += f" for {self.blocked_s:.1f} s"
        details = []
        if self.age_s is not None:
            details.append(f"alive {self.age_s:.2f} s")
        if self.after_test_s is not None:
            details.append(f"{self.after_test_s:.2f} s after its test ended")
        if details:
            text += f" ({', '.join(details)})"
        return text


@dataclass
class FollowedProcess:
    pid: int
    binary: str
    go_version: str
    test_binary: bool
    tests: list[str] = field(default_factory=list)  # top-level tests that ran
    package: str = ""
    captured_at_exit: bool = False
    goroutines_at_exit: int = 0
    exit_goroutine: int = 0  # the goid that called runtime.exit; 0 unknown
    note: str = ""


@dataclass
class CheckReport:
    command: list[str]
    exit_code: int | None  # the command's; None when it could not be started
    duration_s: float
    processes: list[FollowedProcess]
    leaks: list[Leak]
    notes: list[str]
    execs_seen: int = 0

    @property
    def failing(self) -> list[Leak]:
        return [lk for lk in self.leaks if not lk.known]

    def exit_status(self) -> int:
        """The command's own failure wins (returned as is); else 1 on new leaks."""
        if self.exit_code:
            return self.exit_code
        return 1 if self.failing else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "command_exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 3),
            "clean": not self.failing,
            "leaks": [asdict(lk) for lk in self.leaks],
            "processes": [asdict(p) for p in self.processes],
            "notes": self.notes,
            "execs_seen": self.execs_seen,
        }


def _short(function: str) -> str:
    """example.com/x/store.(*S).watch -> store.(*S).watch"""
    return function.rsplit("/", 1)[-1]


def split_symbol(name: str) -> tuple[str, str]:
    """("example.com/x/store", "TestFoo.func1") from a Go symbol."""
    head, slash, tail = name.rpartition("/")
    pkg, _, rest = tail.partition(".")
    return (head + slash + pkg, rest)


# --- rendering ------------------------------------------------------------------------------


def render_text(rep: CheckReport) -> str:
    lines: list[str] = []
    by_test: dict[tuple[str, str], list[Leak]] = {}
    for lk in rep.leaks:
        by_test.setdefault((lk.package, lk.test), []).append(lk)
    for (pkg, test), leaks in sorted(by_test.items()):
        known = all(lk.known for lk in leaks)
        label = "KNOWN" if known else "LEAK"
        lines.append(f"{label} {pkg or leaks[0].binary} {test or '(at exit, outside any test)'}")
        for lk in sorted(leaks, key=lambda x: (x.go_statement, x.function)):
            lines.append(f"  {lk.headline()}" + ("  [in baseline]" if lk.known else ""))
            for fr in lk.stack[:MAX_STACK_FRAMES]:
                fn, _, where = fr.partition(" ")
                lines.append(f"      {fn}")
                lines.append(f"          {where}")
            lines.append(f"      created by {lk.created_by} at {lk.go_statement}")
    traced = [p for p in rep.processes if not p.note]
    tests = sum(len(p.tests) for p in traced)
    n_leaks = sum(lk.count for lk in rep.failing)
    leaking_tests = len({(lk.package, lk.test) for lk in rep.failing})
    lines.append(
        f"goleash check: {' '.join(rep.command)} exited {rep.exit_code} after "
        f"{rep.duration_s:.1f}s; {len(traced)} Go processes followed, {tests} tests seen"
    )
    if rep.failing:
        lines.append(
            f"FAIL: {n_leaks} leaked goroutines from {leaking_tests} tests or exits, "
            f"{len({(lk.function, lk.go_statement) for lk in rep.failing})} creation sites"
        )
    else:
        lines.append("ok: no goroutine leaks")
    for p in rep.processes:
        if p.note:
            lines.append(f"note: PID {p.pid} {p.binary}: {p.note}")
        elif p.test_binary and p.go_version and _old_go(p.go_version):
            lines.append(
                f"note: PID {p.pid} {p.binary} ({p.go_version}): no g.parentGoid before Go 1.21;"
                " creators are read from the creating thread's current goroutine instead"
            )
    lines.extend(f"note: {n}" for n in rep.notes)
    return "\n".join(lines) + "\n"


def _old_go(version: str) -> bool:
    from goleash.gobin.buildinfo import parse_go_version

    return parse_go_version(version) < (1, 21, 0)


def write_junit(rep: CheckReport, path: str) -> None:
    """One testsuite per Go package; each test seen is a testcase, failed if it leaked."""
    import xml.etree.ElementTree as ET

    suites: dict[str, dict[str, list[Leak]]] = {}
    for p in rep.processes:
        for t in p.tests:
            suites.setdefault(p.package or p.binary, {}).setdefault(t, [])
    for lk in rep.failing:
        pkg = lk.package or lk.binary
        name = lk.test.split("/")[0] if lk.test else "goroutines blocked at exit"
        suites.setdefault(pkg, {}).setdefault(name, []).append(lk)
    root = ET.Element("testsuites", name="goleash check")
    total_fail = 0
    for pkg, cases in sorted(suites.items()):
        fails = sum(1 for v in cases.values() if v)
        total_fail += fails
        suite = ET.SubElement(
            root, "testsuite", name=pkg, tests=str(len(cases)), failures=str(fails), errors="0"
        )
        for name, leaks in sorted(cases.items()):
            case = ET.SubElement(suite, "testcase", classname=pkg, name=name)
            if leaks:
                msg = "; ".join(lk.headline() for lk in leaks)
                fail = ET.SubElement(case, "failure", message=msg, type="goroutine leak")
                fail.text = "\n\n".join(
                    lk.headline() + "\n" + "\n".join("  " + f for f in lk.stack) for lk in leaks
                )
    root.set("failures", str(total_fail))
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def print_report(rep: CheckReport, *, as_json: bool) -> None:
    if as_json:
        import json

        json.dump(rep.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(rep))
