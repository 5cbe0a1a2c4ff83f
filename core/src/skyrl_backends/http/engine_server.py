"""Serving engines: the engine API beside the OpenAI endpoint, the address policy, and a server that
answers while its engines load.

``skyrl-backends serve`` uses these pieces:

* :func:`check_exposure`: binding anything but loopback without an API key is refused unless asked
  for explicitly, because the engine API lets whoever reaches the port push weights, put the engine to
  sleep and load LoRA adapters from the server's disk, not only generate;
* :class:`LoadingResponder`: the port is bound before the engines load, and while they load every
  request gets ``503 {"status": "loading"}`` instead of hanging in the listen backlog, so a remote
  engine or an orchestrator can tell "loading" from "gone";
* :func:`with_engine_api`: one ASGI app that hands ``/skyrl/...`` to the engine API and everything
  else to the OpenAI app, each behind its own guards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from typing import Any

from skyrl_backends.errors import ConfigError
from skyrl_backends.http.server import is_loopback

logger = logging.getLogger(__name__)

ENGINE_API_ROOT = "/skyrl/"
ALLOW_NO_API_KEY_FLAG = "--allow-no-api-key"


def check_exposure(host: str, api_key: str | None, allow_no_api_key: bool, engine_api: bool = True) -> None:
    """Refuse (ConfigError for ``host``) a non-loopback ``host`` without ``api_key`` unless
    ``allow_no_api_key`` says the risk is accepted (then log it)."""
    if is_loopback(host) or api_key:
        return
    reach = ("generate, push weights into the engine, put it to sleep and load LoRA adapters from this machine's "
             "disk" if engine_api else "generate with this machine's engines")
    if not allow_no_api_key:
        raise ConfigError("host", f"refusing to serve on {host} without an API key: anyone who can reach this port "
                                  f"could {reach}. Pass --api-key KEY (or set $SKYRL_BACKENDS_API_KEY), bind "
                                  f"127.0.0.1, or pass {ALLOW_NO_API_KEY_FLAG} on a network you trust.")
    logger.warning("serving on %s without an API key (%s): anyone who can reach this port can %s",
                   host, ALLOW_NO_API_KEY_FLAG, reach)


def with_engine_api(openai_app: Any, engine_app: Any) -> Any:
    """One ASGI app: requests under ``/skyrl/`` go to ``engine_app``, the rest (and the server's
    lifespan) to ``openai_app``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path", "").startswith(ENGINE_API_ROOT):
            await engine_app(scope, receive, send)
        else:
            await openai_app(scope, receive, send)

    app.fastapi_app = getattr(openai_app, "fastapi_app", None)  # type: ignore[attr-defined]
    app.engine_app = engine_app  # type: ignore[attr-defined]
    return app


class LoadingResponder:
    """Answers every request on ``sock`` with ``503 {"status": "loading"}`` from a thread of its own
    until :meth:`stop`; the socket stays open and listening for the real server."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock.dup()  # closing the responder's listener leaves the real one open
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="skyrl-loading", daemon=True)

    def start(self) -> LoadingResponder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._answer, sock=self._sock)
        self._ready.set()
        await self._stopping.wait()
        server.close()
        await server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        body = json.dumps({"status": "loading", "error": {
            "message": "the server is loading its engines; retry shortly", "type": "service_unavailable_error",
            "code": "loading", "param": None, "exception": None, "fields": {}}}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)


def stop_on_stdin_close() -> None:
    """SIGTERM this process when its standard input reaches end of file: a parent that started the
    server holds the other end of the pipe, so the server ends with it, even when the parent is killed."""
    import signal
    import sys

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="skyrl-stdin-watch", daemon=True).start()


def write_url_file(path: str, sock: socket.socket) -> str:
    """Write the server's base URL (``http://host:port``) into ``path``; returns it."""
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    with open(path + ".tmp", "w") as handle:
        handle.write(url + "\n")
    os.replace(path + ".tmp", path)  # readers never see half a URL
    return url


__all__ = ["ALLOW_NO_API_KEY_FLAG", "ENGINE_API_ROOT", "LoadingResponder", "check_exposure", "stop_on_stdin_close",
           "with_engine_api", "write_url_file"]
