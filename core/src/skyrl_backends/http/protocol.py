"""uvicorn's HTTP protocol with a deadline on request headers.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for the
headers of a request: a client that opens connections and sends a header byte now and then (or
nothing at all) holds them until the process runs out of sockets, and no application code, API-key
check included, ever runs. :func:`header_timeout_protocol` adds the missing deadline: from a
connection's opening, and from the first byte of each later request, the headers must be complete
within ``header_timeout_s`` or the connection gets 408 and is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

_RESPONSE_BODY = json.dumps({"error": {
    "message": "The request headers did not arrive in time (limit: skyrl-backends serve --header-timeout-s).",
    "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(_RESPONSE_BODY)).encode() + b"\r\n\r\n" + _RESPONSE_BODY)


class _HeaderDeadline:
    """Mixed into a uvicorn HTTP/1.1 protocol class; relies on its ``cycle`` (the request being
    served, replaced when a new request's headers are complete) and ``transport``."""

    header_timeout_s: float = 30.0
    cycle: Any
    transport: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._armed_for: Any = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._between_requests() and (self._header_timer is None or self._armed_for is not self.cycle):
            # The first byte of the next request on a kept-alive connection: its own deadline.
            self._cancel_header_timer()
            self._arm_header_timer()
        super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _between_requests(self) -> bool:
        return self.cycle is None or bool(getattr(self.cycle, "response_complete", False))

    def _arm_header_timer(self) -> None:
        self._armed_for = self.cycle
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.header_timeout_s, self._header_deadline, self._armed_for)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self, armed_for: Any) -> None:
        self._header_timer = None
        if self.cycle is not armed_for:
            return  # a request's headers completed in time (a new cycle started)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()


def header_timeout_protocol(base: type[asyncio.Protocol], header_timeout_s: float) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's H11Protocol or HttpToolsProtocol) with the header deadline."""
    return type(f"HeaderDeadline{base.__name__}", (_HeaderDeadline, base), {"header_timeout_s": header_timeout_s})


def default_http_protocol() -> type[asyncio.Protocol]:
    """The HTTP/1.1 protocol uvicorn would pick (httptools when installed, else h11)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return HttpToolsProtocol
