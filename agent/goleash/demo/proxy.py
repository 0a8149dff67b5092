"""A TCP proxy that can play a congested link.

With a delay set, every chunk read from one side waits that long before it is
written to the other, and the chunks of one connection (one direction) go strictly
in order, one at a time: each connection gets a narrow, slow pipe. That is where
HTTP/2's single multiplexed connection suffers (every stream queues behind every
other, head-of-line) while HTTP/1.1's several connections each get a pipe of their
own. Nothing here knows about HTTP: the client's latency moves because of that.

A client that disconnects leaves its server-side connection open, as a client that
vanished behind a NAT would: a server without IdleTimeout keeps serving nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

CHUNK = 16 * 1024


class CongestedLink:
    """127.0.0.1:port -> upstream, on a thread of its own."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay = 0.0  # seconds each chunk waits; 0: a clean link
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="demo-proxy")
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def start(self) -> int:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = fut.result(timeout=10)
        return self.port

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, close_at_eof: bool
    ) -> None:
        try:
            while data := await r.read(CHUNK):
                if self.delay:
                    await asyncio.sleep(self.delay)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        if close_at_eof:
            w.close()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.close()
            return
        self.connections += 1
        self._open.update((cw, uw))
        await asyncio.gather(
            # the client went away: keep the server's side open (a vanished client)
            self._pump(cr, uw, close_at_eof=False),
            self._pump(ur, cw, close_at_eof=True),
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in self._open:
                w.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
