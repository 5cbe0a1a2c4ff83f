"""ASGI guards in front of the app: API-key check and request body size limit.

Both answer with OpenAI-style JSON errors before the app sees the request. The body limit reads at
most ``max_body_bytes + 1`` bytes, so an oversize upload is refused without being buffered whole,
whether or not it declares a Content-Length; a body that stops arriving gets 408 after
``read_timeout_s`` instead of holding the connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_READ_TIMEOUT_S = 30.0
OPEN_PATHS = ("/health",)  # reachable without the API key (load balancers, liveness probes)


async def send_error(send: Send, status: int, message: str, type_: str, code: str | None = None,
                     param: str | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyGuard:
    """Requires ``Authorization: Bearer <key>`` on every path but :data:`OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(given, self._expected):
            await send_error(send, 401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.",
                             "authentication_error", code="invalid_api_key")
            return
        await self.app(scope, receive, send)


class BodySizeGuard:
    """Refuses request bodies over ``max_bytes`` with 413; passes the body on otherwise."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_error(send, 400, "Content-Length is not a number.", "invalid_request_error")
                return
            if too_big:
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                # A client that announces a body and stops sending must not hold the request forever.
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                await send_error(send, 408, f"The request body did not arrive within {self.read_timeout_s}s.",
                                 "invalid_request_error", code="request_timeout")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would send

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, f"Request body is larger than the limit of {self.max_bytes} bytes.",
                         "invalid_request_error", code="request_too_large")
