"""JSON over HTTP to an engine's own server (``vllm serve``, SGLang's ``launch_server``).

Unlike the engine API of ``skyrl-backends serve`` (:mod:`skyrl_backends.remote.transport`), these
servers know no idempotency keys: a POST that may have reached the server is never sent again (a
generation would run twice). Only a connection that was never made (refused, DNS) is retried; a
connection lost after the request went out, or a server that stays unreachable, raises
:class:`~skyrl_backends.errors.EngineDeadError`, which the engine client fails over. An answer with
an error status is handed back as :class:`ServerAnswer` for the protocol module to map to the
engine's exception, since each server writes its errors its own way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

try:
    import httpx
except ImportError as exc:  # the trainer's side of remote engines is an extra
    raise ImportError("engines behind a vLLM or SGLang server need httpx: pip install 'skyrl-backends[remote]'") \
        from exc

from skyrl_backends.errors import EngineDeadError
from skyrl_backends.remote.http_clients import HttpClients

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Generations run for minutes, and these servers send nothing until a non-streamed one ends.
DEFAULT_READ_TIMEOUT_S = 3600.0
DEFAULT_RETRIES = 3
_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0
# Failures where the request certainly never reached the server: safe to send again.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class ServerAnswer:
    """An HTTP answer: its status and body (parsed JSON, or the text when it is not JSON)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def message(self) -> str:
        """The server's error message, wherever its body keeps it."""
        body = self.body
        if isinstance(body, Mapping):
            error = body.get("error", body.get("message", body.get("detail")))
            if isinstance(error, Mapping):
                error = error.get("message", error)
            if error is not None:
                return str(error)
        return str(body)[:2000]


class ServerHTTP:
    """One server (``base_url``: scheme, host and port, no path)."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, max_connections: int = 1024) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = HttpClients(api_key, connect_timeout_s, read_timeout_s, max_connections)

    def __repr__(self) -> str:
        return f"<ServerHTTP {self.base_url}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- synchronous (while an engine is being connected) ----------------------------------------------
    def wait_ready(self, path: str, wait_ready_s: float) -> None:
        """Until ``GET path`` answers 200 (a server still loading its model answers 503 or not at all)."""
        deadline = time.monotonic() + wait_ready_s
        last: str = "no answer"
        with self._http.synchronous() as client:
            while True:
                try:
                    response = client.get(self.base_url + path)
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}"
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise EngineDeadError(f"engine server {self.base_url} was not ready within {wait_ready_s}s "
                                          f"(GET {path}: {last}); is it running and reachable?")
                time.sleep(0.5)

    def request_sync(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                     json_body: Any = None) -> ServerAnswer:
        with self._http.synchronous() as client:
            try:
                response = client.request(method, self.base_url + path, params=params, json=json_body)
            except httpx.TransportError as exc:
                raise self._dead(exc, 1) from None
            return _answer(response)

    # -- asynchronous ------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json_body: Any = None) -> ServerAnswer:
        """One call; sent again only when the connection was never made."""
        attempt = 0
        while True:
            try:
                response = await self._http.for_this_loop().request(method, self.base_url + path, params=params,
                                                              json=json_body)
                return _answer(response)
            except _NOT_SENT as exc:
                attempt += 1
                if attempt > self.retries:
                    raise self._dead(exc, attempt) from None
                await asyncio.sleep(min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (attempt - 1)))
            except httpx.TransportError as exc:  # sent, maybe received: not repeated
                raise self._dead(exc, attempt + 1) from None

    async def events(self, path: str, json_body: Any) -> AsyncIterator[dict[str, Any] | ServerAnswer]:
        """The server-sent events of one streamed call (``data: {...}`` lines, up to ``[DONE]``),
        each parsed; an answer with an error status is yielded as a :class:`ServerAnswer`, once."""
        attempt = 0
        while True:
            try:
                async with self._http.for_this_loop().stream("POST", self.base_url + path, json=json_body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        yield _answer(response)
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        yield json.loads(data)
                    return
            except _NOT_SENT as exc:
                attempt += 1
                if attempt > self.retries:
                    raise self._dead(exc, attempt) from None
                await asyncio.sleep(min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (attempt - 1)))
            except httpx.TransportError as exc:
                raise self._dead(exc, attempt + 1) from None

    def _dead(self, exc: BaseException, attempts: int) -> EngineDeadError:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return EngineDeadError(f"engine server {self.base_url} did not answer after {attempts} attempt(s) ({what}); "
                               f"is it running and reachable?")


def _answer(response: httpx.Response) -> ServerAnswer:
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = response.text[:2000]
    return ServerAnswer(response.status_code, body)


__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_READ_TIMEOUT_S", "DEFAULT_RETRIES", "ServerAnswer", "ServerHTTP"]
