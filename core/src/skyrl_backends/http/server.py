"""Running the app with uvicorn: in this process (``serve``) or on a background thread
(``BackgroundServer``, for tests and notebooks). Loopback by default; binding any other address is
the caller's explicit choice.

The connection-level limits of :class:`~skyrl_backends.http.settings.HTTPSettings` are applied here:
the header deadline (:mod:`skyrl_backends.http.protocol`), the keep-alive timeout, the connection
limit and uvicorn's log level. Pass the app's own settings (``app.settings`` for an app made by
:func:`~skyrl_backends.http.create_app`), which is the default.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any

import uvicorn

from skyrl_backends.client.loop_thread import LoopThread
from skyrl_backends.http.protocol import default_http_protocol, header_timeout_protocol
from skyrl_backends.http.settings import HTTPSettings

logger = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str = DEFAULT_HOST, port: int = 0) -> socket.socket:
    """A listening socket (``port=0``: a free port, with no window for another process to take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_config(app: Any, settings: HTTPSettings | None = None, **overrides: Any) -> uvicorn.Config:
    settings = settings or getattr(app, "settings", None) or HTTPSettings()
    options = {"log_level": settings.uvicorn_log_level, "access_log": False,
               "timeout_keep_alive": settings.keep_alive_timeout_s, "limit_concurrency": settings.max_connections,
               "backlog": 2048, "timeout_graceful_shutdown": 5,
               "http": header_timeout_protocol(default_http_protocol(), settings.header_timeout_s)}
    options.update(overrides)
    return uvicorn.Config(app, **options)


async def serve(app: Any, host: str = DEFAULT_HOST, port: int = 8000, api_key: str | None = None,
                settings: HTTPSettings | None = None, **uvicorn_options: Any) -> None:
    """Serve until interrupted. A non-loopback ``host`` without an API key is allowed (it is the
    caller's choice) but logged as a warning."""
    if not is_loopback(host) and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can generate", host)
    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn_config(app, settings, **uvicorn_options))
    await server.serve(sockets=[sock])


class BackgroundServer:
    """The app served by uvicorn on a loop thread (its own, or ``loop`` to share one with the
    engines), on loopback by default::

        with BackgroundServer(app) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="x")...

    Everything the app uses (client, engines) must be driven from that loop only.
    """

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, loop: LoopThread | None = None,
                 settings: HTTPSettings | None = None, **uvicorn_options: Any) -> None:
        self._sock = bind_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn_config(app, settings, **uvicorn_options))
        self._own_loop = loop is None
        self.loop_thread = loop or LoopThread("skyrl-http")
        self._serving: Any = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._serving = self.loop_thread.submit(self._server.serve(sockets=[self._sock]))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._serving.done():
            if self._server.started:
                return self
            time.sleep(0.01)
        if self._serving.done():
            self._serving.result()  # raises the startup error
        raise RuntimeError(f"the HTTP server did not start within {timeout_s}s")

    def run_coroutine(self, coro: Any, timeout_s: float = 120.0) -> Any:
        """Run a coroutine on the server's loop (to drive the client it serves)."""
        return self.loop_thread.run(coro, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        if self._serving is not None:
            try:
                self._serving.result(timeout_s)
            except Exception:  # already reported by uvicorn; stopping must not fail
                logger.debug("server task ended with an error", exc_info=True)
        self._sock.close()
        if self._own_loop:
            self.loop_thread.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
