"""ASGI guards in front of the app, outermost first (:func:`guard_app`):

1. concurrency: at most ``max_concurrent_requests`` requests in progress; one more gets 503;
2. Host: on a loopback connection only loopback host names (or ``allowed_hosts``) are served, so a
   web page cannot reach a local server through DNS rebinding;
3. API key: ``Authorization: Bearer <key>`` on every path but :data:`OPEN_PATHS`;
4. Content-Type: a POST must be ``application/json`` (a browser cannot send that cross-origin
   without a CORS preflight, which this server never approves);
5. body: at most ``max_bytes`` (read at most that plus one byte, whether or not a Content-Length is
   declared: 413), all of it within ``body_timeout_s`` (408), however slowly it trickles.

Each answers with an OpenAI-style JSON error that names the limit and how to raise it. Slow
headers and idle connections never reach the app; :mod:`skyrl_backends.http.protocol` handles them.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from skyrl_backends.http.settings import LOOPBACK_HOSTS, HTTPSettings, limit_hint

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health",)  # reachable without the API key (load balancers, liveness probes)
JSON_MEDIA_TYPE = "application/json"


async def send_error(send: Send, status: int, message: str, type_: str, code: str | None = None,
                     param: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ConcurrencyGuard:
    """At most ``limit`` HTTP requests in progress; the next gets 503 with ``Retry-After``."""

    def __init__(self, app: ASGIApp, limit: int, hint: str = "") -> None:
        self.app = app
        self.limit = limit
        self.hint = hint
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            await send_error(send, 503, f"The server is handling {self.in_progress} requests, {self.hint}. "
                                        "Retry later.", "service_unavailable_error", code="too_many_requests",
                             headers=[(b"retry-after", b"1")])
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


def host_name(host_header: bytes) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``[::1]``, ``a.b:80`` -> ``a.b``."""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


class HostGuard:
    """On a connection to a loopback address, serves only Host headers naming loopback (or one of
    ``allowed``, or any when ``allowed`` holds ``"*"``): 421 otherwise. A DNS-rebinding page reaches
    the local server under its own host name, so it is refused before it can read a reply."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] | None = None) -> None:
        self.app = app
        self.allowed = {h.lower() for h in (allowed or ())}
        self.any_host = "*" in self.allowed

    def accepts(self, scope: Scope) -> bool:
        if self.any_host:
            return True
        raw = _header(scope, b"host")
        if raw is None:  # HTTP/1.0 without Host: nothing to rebind
            return True
        name = host_name(raw)
        if name in self.allowed:
            return True
        server = scope.get("server")
        if not server or not is_loopback_address(str(server[0])):
            return True  # a public bind: any Host (use the API key)
        return name in LOOPBACK_HOSTS or is_loopback_address(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.accepts(scope):
            name = host_name(_header(scope, b"host") or b"")
            await send_error(send, 421, f"Host {name!r} is not served: this server listens on loopback and "
                                        "answers only to localhost names (against DNS rebinding). Add the "
                                        "name with `skyrl-backends serve --allowed-hosts NAME`.",
                             "invalid_request_error", code="host_not_allowed")
            return
        await self.app(scope, receive, send)


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


class ContentTypeGuard:
    """A POST must declare ``Content-Type: application/json`` (parameters such as charset allowed): 415.

    One exception: a POST without a body and without an ``Origin`` header, which is what vLLM's and
    TRL's clients send to vLLM's RL routes (``/pause?mode=keep``, ``/start_weight_update``). A
    browser sends ``Origin`` with every POST, so a web page still cannot reach those routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and not _bodyless_non_browser(scope):
            declared = (_header(scope, b"content-type") or b"").decode("latin-1")
            if declared.split(";", 1)[0].strip().lower() != JSON_MEDIA_TYPE:
                await send_error(send, 415, f"Content-Type must be {JSON_MEDIA_TYPE}, got {declared or 'none'!r}.",
                                 "invalid_request_error", code="unsupported_media_type")
                return
        await self.app(scope, receive, send)


def _bodyless_non_browser(scope: Scope) -> bool:
    if _header(scope, b"origin") is not None or _header(scope, b"transfer-encoding") is not None:
        return False
    return (_header(scope, b"content-length") or b"0").strip() == b"0"


class BodySizeGuard:
    """Refuses request bodies over ``max_bytes`` with 413 and bodies not received in full within
    ``body_timeout_s`` with 408; passes the body on otherwise."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float,
                 settings: HTTPSettings | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self._settings = settings

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                # One deadline for the whole body: a body trickled a byte at a time must not hold
                # the request open forever.
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                hint = limit_hint("body_timeout_s", self._settings) if self._settings else "the limit"
                await send_error(send, 408, f"The request body did not arrive in full within {self.body_timeout_s}s, "
                                            f"{hint}.", "invalid_request_error", code="request_timeout")
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
        hint = limit_hint("max_body_bytes", self._settings) if self._settings else "the limit"
        await send_error(send, 413, f"Request body is larger than {self.max_bytes} bytes, {hint}.",
                         "invalid_request_error", code="request_too_large")


class Guarded:
    """The app behind its guards (:func:`guard_app`); the guards stay reachable for tests."""

    def __init__(self, outer: ASGIApp, fastapi_app: Any, **guards: Any) -> None:
        self._outer = outer
        self.fastapi_app = fastapi_app
        for name, guard in guards.items():
            setattr(self, name, guard)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._outer(scope, receive, send)


def guard_app(app: ASGIApp, settings: HTTPSettings, api_key: str | None, fastapi_app: Any = None,
              wrap: Callable[[ASGIApp], ASGIApp] | None = None) -> Guarded:
    """``app`` behind every guard, in the order of the module docstring; ``wrap`` (the metrics)
    goes around them all, so it sees the guards' refusals too."""
    body = BodySizeGuard(app, settings.max_body_bytes, settings.body_timeout_s, settings)
    inner: ASGIApp = ContentTypeGuard(body)
    if api_key:
        inner = ApiKeyGuard(inner, api_key)
    host = HostGuard(inner, settings.allowed_hosts)
    concurrency = ConcurrencyGuard(host, settings.max_concurrent_requests,
                                   limit_hint("max_concurrent_requests", settings))
    outer: ASGIApp = wrap(concurrency) if wrap is not None else concurrency
    guarded = Guarded(outer, fastapi_app if fastapi_app is not None else app, body=body, host=host,
                      concurrency=concurrency)
    guarded.settings = settings
    return guarded
