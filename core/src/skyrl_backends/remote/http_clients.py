"""The httpx clients of one remote server: one asynchronous client per event loop, and synchronous ones.

Both HTTP clients of remote engines (:class:`~skyrl_backends.remote.transport.HttpTransport` for
``skyrl-backends serve``, :class:`~skyrl_backends.remote.native.http.ServerHTTP` for the engines' own
servers) hold their connections here, so that the settings every remote server needs (keep-alive
expiry, authorization, timeouts) are made in one place.
"""

from __future__ import annotations

import asyncio

try:
    import httpx
except ImportError as exc:  # the trainer's side of remote engines is an extra
    raise ImportError("remote engines need httpx: pip install 'skyrl-backends[remote]'") from exc

# A client must drop an idle keep-alive connection before the server does: servers close theirs
# after 5 s (uvicorn's default, under `skyrl-backends serve`, `vllm serve` and SGLang's server), and a
# request sent on a connection the server is closing at that moment fails with a read error, which
# a generation cannot safely repeat (the server may have received it). httpx's own expiry is 5 s too.
IDLE_CONNECTION_EXPIRY_S = 2.0


class HttpClients:
    """Connections to one server. ``read_timeout_s`` bounds each read and write; connections wait for
    a free slot in the pool without a limit (``max_connections`` bounds the pool)."""

    def __init__(self, api_key: str | None, connect_timeout_s: float, read_timeout_s: float,
                 max_connections: int) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=None)
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                   keepalive_expiry=IDLE_CONNECTION_EXPIRY_S)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def for_this_loop(self) -> httpx.AsyncClient:
        """The asynchronous client of the running event loop."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client's connections belong to the loop that opened them: a caller on another loop
            # (asyncio.run per step, say) gets a client of its own.
            self._client = httpx.AsyncClient(headers=self.headers, timeout=self.timeout, limits=self.limits)
            self._loop = loop
        return self._client

    def synchronous(self) -> httpx.Client:
        """A new synchronous client (a context manager), for code that runs outside an event loop."""
        return httpx.Client(headers=self.headers, timeout=self.timeout)

    async def aclose(self) -> None:
        """Close the asynchronous client, if it belongs to the running loop (another loop's client
        cannot be closed from here; its connections expire on their own)."""
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


__all__ = ["IDLE_CONNECTION_EXPIRY_S", "HttpClients"]
