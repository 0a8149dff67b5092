"""`make demo`: the whole story on one machine, headless, in about two minutes.

A std-lib Go HTTP/2 server with three classic leaks and a client that keeps eight
requests in flight run under `goleash run` with the bundled policy; a proxy between
them plays the network. The demo narrates what goleash sees and does, checks every
step through goleash's own API (and the server's report of the protocol on the
wire), writes a report, and exits 0 only if every step was observed. Every process
it starts is stopped on the way out, Ctrl-C and failures included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control.client import ClientOptions, ControlClient, ControlPlaneError
from goleash.demo.build import build, newest_toolchain
from goleash.demo.procs import Proc, Processes
from goleash.demo.proxy import CongestedLink
from goleash.errors import GoleashError
from goleash.signals import ignore_stop_signals, stop_signals_handled_by

SERVER, CLIENT = "demo-server", "demo-client"
READFRAME = "*http2*Framer).ReadFrame"
ROUNDTRIP = "net/http.(*Transport).roundTrip"
DELAY = 0.2  # seconds each chunk waits on the congested link
BASELINE_S = 25.0
CONGESTED_AFTER_FALLBACK_S = 12.0
HTTP2_OFF = "GODEBUG=http2client=0,http2server=0"


def _evidence(event: t.Event) -> dict[str, Any]:
    """A decision's evidence as plain values (`details` is a protobuf Struct)."""
    from google.protobuf.json_format import MessageToDict

    ev = MessageToDict(event.details).get("evidence")
    return ev if isinstance(ev, dict) else {}


class DemoError(GoleashError):
    """A step of the demo did not happen in time."""


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms"


@dataclass
class Step:
    text: str
    at: float | None = None
    detail: str = ""


class Demo:
    def __init__(self, workdir: Path, out: TextIO = sys.stdout) -> None:
        self.dir = workdir
        self.out = out
        self.t0 = time.monotonic()
        self.procs = Processes(self.now)
        self.link: CongestedLink | None = None
        self.api: ControlClient | None = None
        self.flag = workdir / "demo-client.env"
        self.client: Proc | None = None
        self.client_env = ""
        self.restarts: list[tuple[float, int, str]] = []  # (time, pid, env file text)
        self.server_stats: list[tuple[float, dict[str, Any]]] = []
        self.client_stats: list[tuple[float, int, dict[str, Any]]] = []
        self.steps: dict[str, Step] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    # --- narration ---------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.now():5.1f}s] {text}", file=self.out, flush=True)

    def step(self, key: str, text: str, detail: str = "") -> None:
        if key in self.steps:
            return
        self.steps[key] = Step(text, self.now(), detail)
        self.say(f"✔ {text}" + (f": {detail}" if detail else ""))

    def wait(self, what: str, cond: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(every)
        raise DemoError(f"{what} did not happen within {timeout:.0f}s")

    def cleanup(self) -> None:
        self._stop.set()
        self.procs.stop_all()
        if self.link is not None:
            self.link.stop()
        if self.api is not None:
            self.api.close()

    # --- the cast ----------------------------------------------------------------------

    def start_goleash(self) -> str:
        log = self.dir / "goleash.log"
        argv = [
            sys.executable, "-m", "goleash.cli", "run",
            "--listen", "127.0.0.1:0",
            "--db", str(self.dir / "goleash.db"),
            "--exe", f"*/{SERVER}", f"*/{CLIENT}",
            "--interval", "1",
            "--func", "http2.ReadFrame", ROUNDTRIP,
            "--orphan-min-age", "5",
            "--budget", "0.05",
            "--health-listen", "off",
            "--metrics-listen", "off",
        ]  # fmt: skip
        self.procs.spawn("goleash", argv, stderr_to=log)

        def address() -> str | None:
            for line in log.read_text(errors="replace").splitlines():
                m = re.search(r"control plane listening on (\S+)", line)
                if m:
                    return m.group(1)
            if self.procs.first_exited():
                raise DemoError(f"`goleash run` exited; its log: {log}")
            return None

        addr = self.wait("the control plane to listen", address, 60)
        host, _, port = addr.rpartition(":")
        if host in ("0.0.0.0", "[::]", ""):
            addr = f"127.0.0.1:{port}"
        self.api = ControlClient(ClientOptions(server=addr, timeout=10))
        return addr

    def set_policy(self) -> q.SetPolicyResponse:
        assert self.api is not None
        text = (Path(__file__).with_name("policy.yaml")).read_text()
        text = text.replace("@FLAG@", str(self.flag))
        (self.dir / "report").mkdir(exist_ok=True)
        (self.dir / "report" / "policy.yaml").write_text(text)
        return self.api.call("SetPolicy", q.SetPolicyRequest(policy_yaml=text))

    def start_server(self, binary: Path) -> tuple[str, int]:
        def on_line(line: str) -> None:
            if line.startswith("{"):
                self.server_stats.append((self.now(), json.loads(line)))

        p = self.procs.spawn(
            SERVER,
            [str(binary), "-cert", str(self.dir / "cert.pem"), "-leaks-per-second", "5"],
            on_line=on_line,
            stderr_to=self.dir / "server.log",
        )
        line = self.wait(
            "the server to listen",
            lambda: next((s for _, s in p.lines if s.startswith("listening ")), None),
            30,
            0.1,
        )
        host, _, port = line.split()[1].rpartition(":")
        return host, int(port)

    def _start_client(self, binary: Path, env_text: str) -> None:
        env = dict(os.environ)
        for line in env_text.splitlines():
            k, sep, v = line.partition("=")
            if sep and k.strip():
                env[k.strip()] = v.strip()
        assert self.link is not None

        def on_line(line: str) -> None:
            if line.startswith("{") and self.client is not None:
                self.client_stats.append((self.now(), self.client.popen.pid, json.loads(line)))

        argv = [
            str(binary), "-addr", f"127.0.0.1:{self.link.port}",
            "-cert", str(self.dir / "cert.pem"), "-c", "8", "-pause", "20ms",
        ]  # fmt: skip
        self.client = self.procs.spawn(
            CLIENT, argv, env=env, on_line=on_line, stderr_to=self.dir / "client.log"
        )
        self.client_env = env_text
        self.restarts.append((self.now(), self.client.popen.pid, env_text))

    def supervise_client(self, binary: Path) -> None:
        """What a process manager does with an EnvironmentFile it watches: restart the
        client whenever the flag file appears, changes or goes away."""

        def loop() -> None:
            while not self._stop.wait(0.2):
                try:
                    want = self.flag.read_text()
                except FileNotFoundError:
                    want = ""
                if want != self.client_env and self.client is not None:
                    old = self.client
                    self.procs.terminate(old)
                    if self._stop.is_set():
                        return
                    self._start_client(binary, want)

        self._start_client(binary, "")
        threading.Thread(target=loop, name="supervisor", daemon=True).start()

    # --- what goleash says ---------------------------------------------------------------

    def processes(self) -> dict[str, q.ProcessStatus]:
        assert self.api is not None
        resp = self.api.call("ListProcesses", q.ListProcessesRequest(window_seconds=10))
        return {p.info.service: p for p in resp.processes if p.state == q.PROCESS_STATE_RUNNING}

    def latency(self, service: str, pattern: str, window: float = 10) -> tuple[str, float, int]:
        """(function, p99 seconds, calls) over the window; ('', 0, 0) without data."""
        assert self.api is not None
        name = pattern
        if "*" in pattern.replace("(*", "("):
            try:
                self.api.call(
                    "GetFunctionLatency",
                    q.GetFunctionLatencyRequest(
                        function="?", selector=q.ProcessSelector(service=service)
                    ),
                )
            except ControlPlaneError as exc:
                m = re.search(r"\(traced: (.*)\)\s*$", str(exc))
                traced = m.group(1).split(", ") if m else []
                name = next((f for f in traced if "Framer).ReadFrame" in f), "")
            if not name:
                return "", 0.0, 0
        try:
            resp = self.api.call(
                "GetFunctionLatency",
                q.GetFunctionLatencyRequest(
                    function=name,
                    selector=q.ProcessSelector(service=service),
                    window_seconds=window,
                    quantiles=[0.99],
                ),
            )
        except ControlPlaneError:
            return name, 0.0, 0
        return name, resp.quantiles[0].value_seconds, resp.count

    def decisions(self, service: str) -> list[t.Event]:
        assert self.api is not None
        resp = self.api.call(
            "ListDecisions", q.ListDecisionsRequest(service=service, page_size=200)
        )
        return [
            e
            for e in reversed(resp.decisions)
            if e.kind == t.EVENT_KIND_DECISION and e.details["decision"] in ("degrade", "recover")
        ]

    def protos_since(self, since: float) -> set[str]:
        out: set[str] = set()
        for ts, s in self.server_stats:
            if ts >= since:
                out.update(k for k, n in s.get("protos", {}).items() if n)
        return out

    def client_summary(self, since: float, until: float) -> tuple[float, float, str]:
        """(requests per second, median p50 ms, protocol) of the client in [since, until)."""
        rows = [s for ts, _, s in self.client_stats if since <= ts < until and s.get("proto")]
        if not rows:
            return 0.0, 0.0, ""
        rps = sum(r["requests"] for r in rows) / max(len(rows), 1)
        p50s = sorted(r["p50_ms"] for r in rows if r["requests"])
        return rps, (p50s[len(p50s) // 2] if p50s else 0.0), rows[-1]["proto"]

    # --- the story -------------------------------------------------------------------------

    def run(self) -> int:
        version, _ = newest_toolchain()
        self.say(f"building the demo's Go server and client with Go {version} (std lib only)")
        bin_dir = self.dir / "bin"
        server_bin = build("demoserver", SERVER, bin_dir)
        client_bin = build("democlient", CLIENT, bin_dir)
        self.say("starting `goleash run` (node agent + control plane in one process)")
        addr = self.start_goleash()
        pol = self.set_policy()
        self.say(
            f"control plane on {addr}; policy version {pol.version} set ({pol.rules} rules, "
            "enforce): degrade the client to HTTP/1.1 when its HTTP/2 frame reads slow down"
        )
        host, port = self.start_server(server_bin)
        self.link = CongestedLink((host, port))
        self.link.start()
        self.say(
            f"{SERVER} listens on {host}:{port} (HTTPS, HTTP/2 by ALPN); a proxy on port "
            f"{self.link.port} stands for the network; {CLIENT} keeps 8 requests in flight "
            "through it"
        )
        self.supervise_client(client_bin)
        self.wait(
            "goleash to follow both programs",
            lambda: {SERVER, CLIENT} <= set(self.processes()),
            90,
        )
        self.wait(
            "the first HTTP/2 frame-read timings",
            lambda: self.latency(CLIENT, READFRAME)[2] > 0,
            90,
        )
        procs = self.processes()
        self.say(
            f"goleash follows {SERVER} (pid {procs[SERVER].info.pid}) and {CLIENT} (pid "
            f"{procs[CLIENT].info.pid}) from the outside: uprobes and process memory, "
            "no code change"
        )
        self.baseline()
        self.congestion()
        self.recovery()
        return self.report()

    def baseline(self) -> None:
        start = self.now()
        first = self.processes()[SERVER].goroutines
        seen_orphans: set[str] = set()
        base_p99 = 0.0
        while self.now() - start < BASELINE_S:
            time.sleep(5)
            srv = self.processes().get(SERVER)
            fn, p99, calls = self.latency(CLIENT, READFRAME)
            base_p99 = max(base_p99, p99)
            if srv is not None:
                self.say(
                    f"{SERVER}: {srv.goroutines} goroutines (was {first}), "
                    f"{srv.orphans} orphans; {CLIENT}: {fn} p99 {_ms(p99)} over {calls} calls"
                )
                if srv.goroutines > first + 50:
                    self.step("climb", "goroutines climb", f"{first} -> {srv.goroutines}")
            assert self.api is not None
            groups = self.api.call(
                "ListOrphans", q.ListOrphansRequest(selector=q.ProcessSelector(service=SERVER))
            ).groups
            for g in groups:
                if g.go_statement not in seen_orphans:
                    seen_orphans.add(g.go_statement)
                    self.say(
                        f"  orphans: {g.count} goroutines of {g.function} created at "
                        f"{g.go_statement} (in {g.creator_function}), parked in "
                        f"'{g.reason}', oldest {g.oldest_age_seconds:.0f}s; their creator "
                        "has exited and nothing will wake them"
                    )
            if groups:
                top = groups[0]
                self.step(
                    "orphans",
                    "orphans appear with their creation site",
                    f"{top.function} at {Path(top.go_statement).name}",
                )
        suspects = self.api.call(  # type: ignore[union-attr]
            "ListLeakSuspects",
            q.ListLeakSuspectsRequest(selector=q.ProcessSelector(service=SERVER)),
        ).suspects
        for s in suspects[:2]:
            self.say(
                f"  leak suspect: {s.function} at {Path(s.go_statement).name}: "
                f"{s.live} live, {s.growth_per_minute:+.0f}/min, oldest {s.oldest_age_seconds:.0f}s"
            )
        self.timings["baseline_readframe_p99_s"] = base_p99
        self.base_rps, self.base_p50, _ = self.client_summary(start, self.now())
        self.say(
            f"a healthy link: {CLIENT} does {self.base_rps:.0f} requests/s, median "
            f"{self.base_p50:.1f} ms, over one HTTP/2 connection"
        )

    def congestion(self) -> None:
        assert self.link is not None
        self.link.delay = DELAY
        t_cond = self.now()
        conns = self.link.connections
        self.say(
            f"the link congests: every 16 KiB chunk now waits {_ms(DELAY)}, in order, per "
            "connection. HTTP/2 multiplexes all 8 requests on one connection, so they queue "
            "behind each other"
        )
        fired: t.Event | None = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and fired is None:
            time.sleep(1)
            fn, p99, calls = self.latency(CLIENT, READFRAME, window=5)
            if p99 > self.timings["baseline_readframe_p99_s"] + 0.1 and calls:
                self.step(
                    "jump",
                    f"the client's {fn} p99 jumps",
                    f"{_ms(self.timings['baseline_readframe_p99_s'])} -> {_ms(p99)}",
                )
            degrades = [e for e in self.decisions(CLIENT) if e.details["decision"] == "degrade"]
            if degrades:
                fired = degrades[0]
        if fired is None:
            raise DemoError("the policy did not fire within 90s of the congestion")
        t_fire = self.now()
        ev = _evidence(fired)
        if "baseline" in ev:  # what the policy measured, if we missed it
            self.step(
                "jump",
                "the client's HTTP/2 ReadFrame p99 jumps",
                f"{_ms(ev['baseline'])} -> {_ms(ev['measured'])} (the decision's evidence)",
            )
        self.timings["condition_to_decision_s"] = t_fire - t_cond
        self.step("fired", "the policy fires", fired.message)
        self.fired = fired
        self.wait("the flag file", self.flag.exists, 30, 0.1)
        t_action = self.now()
        restart = self.wait(
            "the client's restart with HTTP/2 off",
            lambda: next((r for r in self.restarts if r[2]), None),
            30,
            0.1,
        )
        environ = Path(f"/proc/{restart[1]}/environ").read_bytes().split(b"\0")
        if HTTP2_OFF.encode() not in environ:
            raise DemoError(f"the restarted client (pid {restart[1]}) has no {HTTP2_OFF}")
        self.timings["condition_to_action_s"] = t_action - t_cond
        self.step(
            "restarted",
            "the client is restarted with HTTP/2 off",
            f"pid {restart[1]} with {HTTP2_OFF} (from the flag file the policy wrote)",
        )
        self.wait("HTTP/1.1 on the wire", lambda: "HTTP/1.1" in self.protos_since(t_action), 30)
        t_h1 = self.now()
        self.timings["condition_to_http11_s"] = t_h1 - t_cond
        self.step("http11", "the server observes HTTP/1.1 on the wire", "r.Proto == HTTP/1.1")
        h2_rps, h2_p50, _ = self.client_summary(t_cond + 3, t_fire)
        time.sleep(CONGESTED_AFTER_FALLBACK_S)
        h1_rps, h1_p50, proto = self.client_summary(t_h1 + 3, self.now())
        self.say(
            f"same congested link: over HTTP/2 the client did {h2_rps:.1f} requests/s (median "
            f"{h2_p50:.0f} ms); over HTTP/1.1 ({self.link.connections - conns} new "
            f"connections) it does {h1_rps:.1f} requests/s (median {h1_p50:.0f} ms)"
        )
        self.timings.update(
            http2_congested_rps=h2_rps,
            http2_congested_p50_ms=h2_p50,
            http11_congested_rps=h1_rps,
            http11_congested_p50_ms=h1_p50,
        )

    def recovery(self) -> None:
        assert self.link is not None
        self.link.delay = 0.0
        t_ok = self.now()
        self.step("clear", "the congestion ends", "the proxy forwards without delay again")
        rec = self.wait(
            "the recovery decision",
            lambda: next(
                (e for e in self.decisions(CLIENT) if e.details["decision"] == "recover"), None
            ),
            120,
            1.0,
        )
        t_rec = self.now()
        self.step("recovered", "after the hold, the policy recovers the client", rec.message)
        self.wait("the flag file to go", lambda: not self.flag.exists(), 30, 0.1)
        restart = self.wait(
            "the client's restart with HTTP/2 on",
            lambda: next((r for r in self.restarts[2:] if not r[2]), None),
            30,
            0.1,
        )
        t_restart = self.now()
        self.wait("HTTP/2 on the wire", lambda: "HTTP/2.0" in self.protos_since(t_restart), 30)
        t_h2 = self.now()
        self.timings["recovery_condition_to_decision_s"] = t_rec - t_ok
        self.timings["recovery_condition_to_http2_s"] = t_h2 - t_ok
        self.step(
            "http2",
            "the client is back on HTTP/2",
            f"pid {restart[1]}, the server sees r.Proto == HTTP/2.0 again",
        )

    def report(self) -> int:
        assert self.api is not None
        rdir = self.dir / "report"
        rdir.mkdir(exist_ok=True)
        events: list[t.Event] = []
        token = ""
        while True:
            resp = self.api.call(
                "ListEvents", q.ListEventsRequest(page_size=1000, page_token=token)
            )
            events.extend(resp.events)
            token = resp.next_page_token
            if not token:
                break
        from goleash.control import views

        with open(rdir / "events.jsonl", "w") as f:
            for e in events:
                f.write(json.dumps(views.event_dict(e), default=str) + "\n")
        svg = ""
        ev = _evidence(self.fired)
        if "flamegraph_svg" in ev:
            src = Path(ev["flamegraph_svg"])
            if src.exists():
                svg = str(rdir / "flamegraph.svg")
                shutil.copy2(src, svg)
        server_svg = sorted((self.dir / "reports").glob(f"*{SERVER}*.svg"))
        if server_svg:
            shutil.copy2(server_svg[-1], rdir / "flamegraph-server.svg")
        (rdir / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")
        tm = self.timings
        self.say("─" * 60)
        self.say(
            f"congestion -> decision {tm['condition_to_decision_s']:.1f}s, -> action "
            f"{tm['condition_to_action_s']:.1f}s, -> HTTP/1.1 on the wire "
            f"{tm['condition_to_http11_s']:.1f}s"
        )
        self.say(
            f"congestion over -> recovery decision {tm['recovery_condition_to_decision_s']:.1f}s, "
            f"-> HTTP/2 on the wire {tm['recovery_condition_to_http2_s']:.1f}s "
            "(10s of it is the policy's hold)"
        )
        self.say(f"report: {rdir}/ (events.jsonl, policy.yaml, timings.json)")
        if svg:
            self.say(f"flame graph of the client's goroutines by creation site: {svg}")
        if server_svg:
            self.say(f"flame graph of the server's goroutines: {rdir / 'flamegraph-server.svg'}")
        self.say(f"goleash's own log and database: {self.dir}/goleash.log, goleash.db")
        return 0


EXPECTED = (
    "climb",
    "orphans",
    "jump",
    "fired",
    "restarted",
    "http11",
    "clear",
    "recovered",
    "http2",
)


def main() -> int:
    if os.geteuid() != 0:
        print(
            "goleash demo: needs root (BPF uprobes, reading process memory): sudo make demo",
            file=sys.stderr,
        )
        return 2
    base = Path(os.environ.get("GOLEASH_DEMO_DIR", tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix="goleash-demo-", dir=base))
    demo = Demo(workdir)

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too when started with it ignored (`cmd &`)
    with stop_signals_handled_by(on_term):
        code = 1
        try:
            code = demo.run()
        except KeyboardInterrupt:
            demo.say("interrupted: stopping everything the demo started")
            code = 130
        except GoleashError as exc:
            demo.say(f"✘ {exc}")
            code = 1
        finally:
            ignore_stop_signals()  # a second Ctrl-C must not cut the clean-up short
            demo.cleanup()
        missing = [k for k in EXPECTED if k not in demo.steps]
        if code == 0 and missing:
            demo.say(f"✘ steps not observed: {', '.join(missing)}")
            code = 1
        if code != 0:
            demo.say(f"logs kept in {workdir} (goleash.log, server.log, client.log)")
        else:
            demo.say(f"every step observed ({len(EXPECTED)} of {len(EXPECTED)})")
    return code
