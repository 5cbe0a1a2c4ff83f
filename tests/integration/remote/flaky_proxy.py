"""A TCP proxy between a remote engine and its server that breaks connections on demand: the
network failures a retry must survive, made reproducible.

``cut_after(marker)``: the next connection whose server-to-client bytes contain ``marker`` is
closed right after forwarding them (a reset in the middle of an answer). ``stall()``: server bytes
stop being forwarded (a server that went silent without closing anything) until ``resume()``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from skyrl_backends.client.loop_thread import LoopThread


class FlakyProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.connections = 0
        self.cuts = 0
        self._marker: bytes | None = None
        self._then: Callable[[], None] | None = None
        self._loop = LoopThread("flaky-proxy")
        self._server = self._loop.run(self._start())
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self) -> asyncio.base_events.Server:
        self._flowing = asyncio.Event()
        self._flowing.set()
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    def cut_after(self, marker: bytes, then: Callable[[], None] | None = None) -> None:
        """Cut the next connection whose answer contains ``marker``; ``then`` runs right after the cut."""
        self._marker = marker
        self._then = then

    def stall(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._flowing.set)

    async def _handle(self, client_reader, client_writer) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                await self._flowing.wait()
                client_writer.write(data)
                await client_writer.drain()
                if self._marker is not None and self._marker in data:
                    self._marker = None
                    self.cuts += 1
                    await asyncio.sleep(0.2)  # the caller reads what it got (a reset drops unread bytes)
                    client_writer.transport.abort()  # a reset, not a clean end of the answer
                    server_writer.transport.abort()
                    if self._then is not None:
                        self._then()
                    return
            client_writer.close()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_writer, server_writer):
            with contextlib.suppress(Exception):
                writer.transport.abort()

    def close(self) -> None:
        self._loop.run(self._stop())
        self._loop.stop()

    async def _stop(self) -> None:
        self._server.close()
        self._flowing.set()
