"""Getting batches to the control plane: a bounded buffer and one ingest stream.

Batches are numbered when assembled and queued here; a sender thread keeps one
`IngestService.StreamBatches` call open and writes them in order. When the stream
breaks (control plane restarted, network), batches keep queueing; the oldest never
sent are dropped when the buffer is full and counted ("batches_buffer_full", reported
in the next batch that goes out, so the control plane learns how much it missed).
Reconnects back off exponentially (with jitter) up to a cap.

A client stream has no per-message acknowledgement: a batch written just before the
connection broke may never have been read. So batches sent within the last
`inflight_s` before a failure are sent again on the next stream; the control plane
ignores sequence numbers it has applied (ingest contract), so this loses nothing and
duplicates nothing on a control plane that stayed up. A control plane that restarted
has forgotten them and applies them, which restores what it lost with its memory.

The first batch of every stream re-announces every followed process (ingest
contract: a restarted control plane learns them again), from the set the agent
followed when that batch was assembled.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from goleash.api.goleash.v1 import ingest_service_pb2 as ing
from goleash.api.goleash.v1 import ingest_service_pb2_grpc as ing_grpc
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.errors import GoleashError
from goleash.node import DEFAULT_MAX_BATCHES  # noqa: F401  (defined there for the CLI)

log = logging.getLogger("goleash.agent")

BUFFER_FULL = "batches_buffer_full"
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class SenderSetupError(GoleashError):
    """The agent cannot talk to the control plane with this configuration."""


@dataclass(eq=False)
class Entry:
    batch: ing.AgentBatch
    announce: Sequence[t.ProcessInfo]  # every process followed when it was assembled
    size: int
    sent_at: float | None = None  # time.monotonic() of the last send
    drops: dict[str, int] | None = None  # agent drops attached at its first send


class BatchBuffer:
    """Batches not yet known to be delivered, oldest first, bounded by count and bytes."""

    def __init__(
        self, max_batches: int = DEFAULT_MAX_BATCHES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_batches < 1:
            raise GoleashError("the batch buffer must hold at least one batch")
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._q: deque[Entry] = deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self.drops: Counter[str] = Counter()  # since start, by reason
        self._reported: Counter[str] = Counter()

    def __len__(self) -> int:
        with self._cv:
            return len(self._q)

    @property
    def unsent(self) -> int:
        with self._cv:
            return sum(1 for e in self._q if e.sent_at is None)

    def drop_counts(self) -> dict[str, int]:
        with self._cv:
            return dict(self.drops)

    def count_drop(self, reason: str, n: int = 1) -> None:
        with self._cv:
            self.drops[reason] += n

    def put(self, batch: ing.AgentBatch, announce: Sequence[t.ProcessInfo]) -> None:
        e = Entry(batch, tuple(announce), batch.ByteSize())
        with self._cv:
            self._q.append(e)
            self._bytes += e.size
            while len(self._q) > self.max_batches or (
                self._bytes > self.max_bytes and len(self._q) > 1
            ):
                old = self._q.popleft()
                self._bytes -= old.size
                if old.drops is None:  # never sent (one sent before most likely arrived)
                    self.drops[BUFFER_FULL] += 1
            self._cv.notify_all()

    def next_unsent(self, timeout: float, *, keep_sent_s: float) -> Entry | None:
        """The oldest batch not sent yet (waiting up to `timeout`); forgets batches sent
        more than keep_sent_s ago."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                while self._q and self._q[0].sent_at is not None:
                    if now - self._q[0].sent_at <= keep_sent_s:
                        break
                    self._bytes -= self._q.popleft().size
                for e in self._q:
                    if e.sent_at is None:
                        return e
                left = deadline - now
                if left <= 0:
                    return None
                self._cv.wait(left)

    def mark_sent(self, e: Entry) -> None:
        with self._cv:
            e.sent_at = time.monotonic()
            if e.drops is None:
                e.drops = {k: v - self._reported[k] for k, v in self.drops.items()}
                e.drops = {k: v for k, v in e.drops.items() if v > 0}
                self._reported = Counter(self.drops)

    def rewind(self, since: float, *, give_up: bool = False) -> int:
        """Batches sent at or after `since` (monotonic) are to be sent again (or, with
        give_up, forgotten and counted as rejected); returns how many."""
        n = 0
        with self._cv:
            for e in list(self._q):
                if e.sent_at is not None and e.sent_at >= since:
                    n += 1
                    if give_up:
                        self._q.remove(e)
                        self._bytes -= e.size
                        self.drops["batches_rejected"] += 1
                    else:
                        e.sent_at = None
            self._cv.notify_all()
        return n

    def wait_empty(self, timeout: float) -> bool:
        """Until every batch has been sent at least once, or timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(e.sent_at is None for e in self._q):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            return True


@dataclass(frozen=True)
class SenderOptions:
    server: str
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 8 * 1024 * 1024
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SenderSetupError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def make_channel(opts: SenderOptions) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", opts.max_message_bytes),
        # gRPC's own reconnect backoff would grow to 2 minutes; ours caps it.
        ("grpc.initial_reconnect_backoff_ms", int(opts.backoff_initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(opts.backoff_max_s * 1000)),
        # gRPC servers count pings closer than 5 minutes as abuse by default (and a
        # client stream gets no data back to reset that), so a little over 5 minutes:
        # this still finds a peer that vanished without closing the connection.
        ("grpc.keepalive_time_ms", 330_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]
    if opts.tls_ca or opts.tls_cert or opts.tls_key:
        if bool(opts.tls_cert) != bool(opts.tls_key):
            raise SenderSetupError("mTLS needs both --tls-cert and --tls-key")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(opts.tls_ca, "TLS CA bundle") if opts.tls_ca else None,
            private_key=_read(opts.tls_key, "TLS key") if opts.tls_key else None,
            certificate_chain=_read(opts.tls_cert, "TLS certificate") if opts.tls_cert else None,
        )
        return grpc.secure_channel(opts.server, creds, options=options)
    return grpc.insecure_channel(opts.server, options=options)


@dataclass
class _Gate:
    """One stream's generator may mark batches sent only while the stream is open."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


@dataclass
class SenderStats:
    connected: bool = False
    streams: int = 0
    reconnects: int = 0  # streams started after a failed one
    batches_sent: int = 0  # writes, resends included
    resent: int = 0
    last_error: str = ""
    responses: list[ing.StreamBatchesResponse] = field(default_factory=list)


class IngestSender:
    """Keeps one ingest stream to the control plane fed from a BatchBuffer."""

    def __init__(self, opts: SenderOptions, buffer: BatchBuffer, *, inflight_s: float) -> None:
        self.opts = opts
        self.buffer = buffer
        self.inflight_s = inflight_s
        self.stats = SenderStats()
        self._channel = make_channel(opts)
        self._stub = ing_grpc.IngestServiceStub(self._channel)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ingest-sender", daemon=True)
        self._metadata = (("authorization", f"Bearer {opts.token}"),) if opts.token else ()

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush_timeout: float = 2.0) -> None:
        """Send what is buffered (up to flush_timeout), end the stream, stop."""
        if self.stats.connected:
            self.buffer.wait_empty(flush_timeout)
        self._draining.set()
        self._thread.join(timeout=flush_timeout + 1)
        self._stop.set()
        self._thread.join(timeout=2)
        self._wait_poller_gone()
        self._channel.close()

    def _wait_poller_gone(self, timeout: float = 1.0) -> None:
        """gRPC's connectivity poller (started by channel_ready_future) outlives its
        cancel by up to 0.2 s; a channel closed under it kills that thread with a
        traceback ("Channel closed!"). Its flag is private: if gRPC drops it, skip."""
        state = getattr(self._channel, "_connectivity_state", None)
        deadline = time.monotonic() + timeout
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(0.02)

    # --- the stream ---------------------------------------------------------------------

    def _wire(self, e: Entry, first: bool) -> ing.AgentBatch:
        if not first and not e.drops:
            return e.batch
        msg = ing.AgentBatch()
        msg.CopyFrom(e.batch)
        if first:
            listed = {p.pid for p in msg.processes_appeared}
            msg.processes_appeared.extend(p for p in e.announce if p.pid not in listed)
        for reason, n in sorted((e.drops or {}).items()):
            msg.drops.add(reason=reason, count=n)
        return msg

    def _requests(self, gate: _Gate) -> Iterator[ing.StreamBatchesRequest]:
        first = True
        while not gate.closed and not self._stop.is_set():
            e = self.buffer.next_unsent(0.2, keep_sent_s=self.inflight_s)
            if e is None:
                if self._draining.is_set():
                    return  # half-close: the control plane answers with its summary
                continue
            with gate.lock:
                # gRPC may still pull from this generator after the call failed; a batch
                # marked sent after the failure was handled would never be resent.
                if gate.closed:
                    return
                self.buffer.mark_sent(e)  # attaches the drops not reported yet
                msg = self._wire(e, first)
            first = False
            self.stats.batches_sent += 1
            yield ing.StreamBatchesRequest(batch=msg)

    def _one_stream(self) -> grpc.RpcError | None:
        gate = _Gate()
        try:
            return self._call(gate)
        finally:
            with gate.lock:
                gate.closed = True

    def _call(self, gate: _Gate) -> grpc.RpcError | None:
        done = threading.Event()
        call = self._stub.StreamBatches.future(
            self._requests(gate), metadata=self._metadata, wait_for_ready=False
        )
        call.add_done_callback(lambda _f: done.set())
        while not done.wait(0.2):
            if self._stop.is_set():
                call.cancel()
                break
        try:
            resp = call.result(timeout=5)
        except grpc.RpcError as exc:
            return exc
        except grpc.FutureCancelledError:
            return None
        except grpc.FutureTimeoutError:
            call.cancel()
            return None
        self.stats.responses.append(resp)
        return None

    def _wait_connected(self) -> bool:
        """Until the channel is up (gRPC reconnects with its own backoff, capped at
        backoff_max_s), or the sender stops."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            while not self._stop.is_set() and not self._draining.is_set():
                try:
                    ready.result(timeout=0.5)
                    return True
                except grpc.FutureTimeoutError:
                    continue
            return False
        finally:
            ready.cancel()

    def _loop(self) -> None:
        delay = self.opts.backoff_initial_s
        quiet_until = 0.0
        # Connected means: the channel came up and its stream has not failed since. No
        # connectivity subscription: gRPC's poller thread for it could outlive the
        # channel's close and die with a traceback at every agent stop.
        while self._wait_connected():
            self._set_connected(True)
            began = time.monotonic()
            self.stats.streams += 1
            err = self._one_stream()
            self._set_connected(False)
            if self._stop.is_set() or self._draining.is_set():
                break
            failed = time.monotonic()
            # A stream the control plane ended without an error is reconnected too.
            code = grpc.StatusCode.UNAVAILABLE if err is None else err.code()  # type: ignore[attr-defined]
            details = "ended by the control plane" if err is None else err.details()  # type: ignore[attr-defined]
            self.stats.last_error = f"{code.name}: {details}"
            # Refused, not unreachable: the same batches would be refused again. Refused
            # credentials are not the batches' fault: they wait (bounded) for a fix.
            refused = code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, *DENIED)
            self.stats.resent += self.buffer.rewind(failed - self.inflight_s, give_up=refused)
            if code in DENIED and failed >= quiet_until:
                log.error(
                    "the control plane at %s refused this agent (%s): it needs a token of the "
                    "agent role (--token-file) or a client certificate mapped to it, and the "
                    "agent id must not be written by another identity; buffering",
                    self.opts.server,
                    self.stats.last_error,
                )
                quiet_until = failed + 60
            elif failed >= quiet_until:
                log.warning(
                    "ingest stream to %s ended (%s); buffering up to %d batches while reconnecting",
                    self.opts.server,
                    self.stats.last_error,
                    self.buffer.max_batches,
                )
                quiet_until = failed + 60
            # Streams that keep ending at once (a control plane refusing them) back off
            # here; an unreachable one backs off in gRPC's reconnects (_wait_connected).
            if failed - began > 10:
                delay = self.opts.backoff_initial_s
            self._stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.opts.backoff_max_s)
            self.stats.reconnects += 1

    def _set_connected(self, connected: bool) -> None:
        was = self.stats.connected
        self.stats.connected = connected
        if connected and not was:
            log.info("connected to the control plane at %s", self.opts.server)
