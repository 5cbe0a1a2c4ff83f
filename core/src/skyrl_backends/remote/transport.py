"""HTTP for the remote engine: timeouts, retries that never run a call twice, and error mapping.

Every call the remote engine makes goes through :class:`HttpTransport`:

* **Calls are operations with an idempotency key.** A POST carries an ``Idempotency-Key`` chosen
  once per call. When the connection fails (refused, reset, a proxy that hangs up) or the server
  stops sending (no event, not even a heartbeat, for ``heartbeat_timeout_s``), the call is sent
  again with the same key and the number of events already received: the server attaches it to the
  operation it is already running (or has finished), so a generation or a weight update is never
  run twice and a stream resumes where it broke (:mod:`skyrl_backends.http.engine_operations`).
* **Liveness by heartbeats, not by a deadline on the call.** The server sends an event at least
  every few seconds while a call runs, so a long generation is never cut by a read timeout and a
  server that vanished is noticed within ``heartbeat_timeout_s``.
* **Failures the client fails over.** After ``retries`` failed attempts the call raises
  :class:`~skyrl_backends.errors.EngineDeadError`; an answer from the server is never retried except
  "still loading", and its error is rebuilt as the engine's own exception class
  (:func:`skyrl_backends.remote.wire.error_from_json`).

httpx is the HTTP client (``pip install 'skyrl-backends[http]'``); a client is made per event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

try:
    import httpx
except ImportError as exc:  # the trainer's side of remote engines is an extra
    raise ImportError("remote engines need httpx: pip install 'skyrl-backends[remote]'") from exc

from skyrl_backends.errors import EngineDeadError
from skyrl_backends.remote import wire
from skyrl_backends.remote.http_clients import HttpClients

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0
_BUSY_RETRY_S = 1.0  # the guard's Retry-After
# What a broken connection or an unresponsive server looks like to httpx (retried with the same key).
_RETRYABLE = (httpx.TransportError,)


class _Loading(Exception):
    """The server answered that its engine is still loading (retried until ready)."""


class _Busy(Exception):
    """The server refused the call before starting it: too many requests at once (503 with
    ``Retry-After``). Sent again, with the same key, for up to ``heartbeat_timeout_s``."""


class HttpTransport:
    """One server's engine API (``base_url`` ends with the API prefix, e.g. ``.../skyrl/v1``)."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S, max_connections: int = 1024) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._http = HttpClients(api_key, connect_timeout_s, heartbeat_timeout_s, max_connections)

    def __repr__(self) -> str:
        return f"<HttpTransport {self.base_url}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- calls ------------------------------------------------------------------------------------------
    def get_sync(self, path: str, wait_ready_s: float = 0.0) -> Any:
        """A GET from synchronous code (connecting happens in ``create_engine``), waiting up to
        ``wait_ready_s`` for a server that is starting or still loading its engine."""
        deadline = time.monotonic() + wait_ready_s
        with self._http.synchronous() as client:
            attempt = 0
            while True:
                try:
                    response = client.get(self.base_url + path)
                    return self._decode(response)
                except (_Loading, *_RETRYABLE) as exc:
                    attempt += 1
                    if time.monotonic() >= deadline and attempt > self.retries:
                        raise self._dead(exc, attempt) from None
                    time.sleep(self._backoff(attempt) if time.monotonic() >= deadline else 0.2)

    def post_sync(self, path: str, body: dict[str, Any]) -> Any:
        with self._http.synchronous() as client:
            try:
                return self._decode(client.post(self.base_url + path, content=wire.dumps(body),
                                                headers={"Content-Type": "application/json"}))
            except (_Loading, *_RETRYABLE) as exc:
                raise self._dead(exc, 1) from None

    async def get(self, path: str) -> Any:
        attempt = 0
        while True:
            try:
                return self._decode(await self._http.for_this_loop().get(self.base_url + path))
            except (_Loading, *_RETRYABLE) as exc:
                attempt += 1
                if attempt > self.retries:
                    raise self._dead(exc, attempt) from None
                await asyncio.sleep(self._backoff(attempt))

    async def events(self, path: str, body: dict[str, Any], key: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The events of one operation (``accepted``, ``chunk`` s, then ``result``), heartbeats left
        out; an ``error`` event is raised as its exception. A broken connection is retried with the
        same key from the first event not yet received."""
        key = key or uuid.uuid4().hex
        content = wire.dumps(body)
        seen = 0
        attempt = 0
        busy_since: float | None = None
        while True:
            try:
                async for event in self._stream_once(path, content, key, seen):
                    kind = event.get("event")
                    if kind == "heartbeat":
                        continue
                    seen += 1
                    attempt = 0  # progress: a later break gets its own retries
                    if kind == "error":
                        raise wire.error_from_json(event, int(event.get("status", 500)))
                    yield event
                    if kind == "result":
                        return
                raise httpx.RemoteProtocolError("the server ended the event stream before the call's outcome")
            except _Busy as exc:
                busy_since = busy_since or time.monotonic()
                if time.monotonic() - busy_since > self.heartbeat_timeout_s:
                    raise self._dead(exc, attempt + 1) from None
                await asyncio.sleep(_BUSY_RETRY_S)
            except (_Loading, *_RETRYABLE) as exc:
                attempt += 1
                if attempt > self.retries:
                    raise self._dead(exc, attempt) from None
                await asyncio.sleep(self._backoff(attempt))

    async def call(self, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """The ``result`` event of a call that returns once (``result`` and the engine's ``state``)."""
        async for event in self.events(path, body, key):
            if event.get("event") == "result":
                return event
        raise AssertionError("unreachable: events() returns after the result")  # pragma: no cover

    async def _stream_once(self, path: str, content: bytes, key: str, start: int) -> AsyncIterator[dict[str, Any]]:
        headers = {"Accept": wire.NDJSON, "Content-Type": "application/json", wire.IDEMPOTENCY_HEADER: key,
                   wire.RESUME_HEADER: str(start)}
        client = self._http.for_this_loop()
        async with client.stream("POST", self.base_url + path, content=content, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                self._decode(response)  # raises the server's error
            if start and response.headers.get(wire.OPERATION_HEADER) == "new":
                # The call broke, and the server no longer knows it (it restarted): running it again
                # here would splice two runs (and repeat a weight update). The engine that had it is gone.
                raise EngineDeadError(f"engine server {self.base_url} lost a call in progress (did it restart?); "
                                      f"it was not run again")
            async for line in response.aiter_lines():
                if line:
                    yield wire.loads(line)

    # -- answers ----------------------------------------------------------------------------------------
    def _decode(self, response: httpx.Response) -> Any:
        try:
            body = wire.loads(response.content) if response.content else None
        except ValueError:
            body = response.text[:500]
        if response.status_code == 200:
            return body
        if wire.is_loading(body, response.status_code):
            raise _Loading(f"{self.base_url}: the engine is still loading")
        if wire.is_busy(body, response.status_code):
            raise _Busy(f"{self.base_url}: too many requests at once")
        raise wire.error_from_json(body, response.status_code)

    def _backoff(self, attempt: int) -> float:
        return min(_MAX_BACKOFF_S, self.retry_backoff_s * 2 ** (attempt - 1))

    def _dead(self, exc: BaseException, attempts: int) -> EngineDeadError:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return EngineDeadError(f"engine server {self.base_url} did not answer after {attempts} attempt(s) ({what}); "
                               f"is it running and reachable?")


__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_HEARTBEAT_TIMEOUT_S", "DEFAULT_RETRIES",
           "HttpTransport"]
