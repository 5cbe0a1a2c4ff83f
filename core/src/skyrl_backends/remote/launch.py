"""Starting an engine server as a child process on this machine, and a remote engine that owns it.

``launch_engine("transformers", model=DIR, dtype="float32")`` runs ``skyrl-backends serve`` in a
process of its own on a free loopback port and returns a :class:`~skyrl_backends.remote.RemoteEngine`
connected to it; tearing the engine down stops the process. The conformance suite runs through the
wire this way, and it is how to keep an engine's memory and crashes out of the trainer's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from skyrl_backends.errors import BackendLoadError
from skyrl_backends.remote import wire
from skyrl_backends.remote.child_process import DEFAULT_START_TIMEOUT_S, log_tail, stop_child
from skyrl_backends.remote.connect import API_KEY_ENV, connect_engine
from skyrl_backends.remote.engine import RemoteEngine
from skyrl_backends.remote.transport import httpx


class ServerProcess:
    """``skyrl-backends serve`` for one engine of ``backend``, on ``host`` (loopback) and a free port.

    ``options`` are generator-config fields (passed as ``generator.KEY=VALUE``). The API key, if
    any, reaches the child through its environment, never its command line."""

    def __init__(self, backend: str, model: str | os.PathLike[str], *, options: dict[str, Any] | None = None,
                 api_key: str | None = None, host: str = "127.0.0.1", python: str = sys.executable,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.backend = backend
        self.api_key = api_key
        self._dir = tempfile.TemporaryDirectory(prefix="skyrl-engine-server-")
        self.url_file = Path(self._dir.name) / "url"
        self.log_path = Path(self._dir.name) / "server.log"
        overrides = [f"generator.{key}={json.dumps(value)}" for key, value in (options or {}).items()]
        self.command = [python, "-m", "skyrl_backends.cli", "serve", "--backend", backend,
                        "--model", os.fspath(model), "--host", host, "--port", "0",
                        "--url-file", str(self.url_file), "--stop-on-stdin-close", *(extra_args or []), *overrides]
        child_env = {**os.environ, **(env or {})}
        child_env.pop(API_KEY_ENV, None)
        if api_key:
            child_env[API_KEY_ENV] = api_key
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # The child's stdin is a pipe only this process writes: when this process ends, however it
        # ends, the pipe closes and the server stops (--stop-on-stdin-close). Its own session keeps a
        # terminal's Ctrl-C for the parent, which stops the server in order.
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        self.url: str | None = None

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> str:
        """Wait until the server's engine is loaded; returns the server's base URL."""
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendLoadError(self.backend, None, f"the engine server exited with code "
                                                           f"{self.process.returncode}:\n{self.log_tail()}")
            if self.url is None and self.url_file.exists():
                text = self.url_file.read_text().strip()
                self.url = text or None
            if self.url is not None:
                try:
                    response = httpx.get(self.url + wire.API_PREFIX + "/health", headers=headers, timeout=5.0)
                    if response.status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise BackendLoadError(self.backend, None, f"the engine server did not become ready within {timeout_s}s:\n"
                                                   f"{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s) and what is left of its process
        session, and remove its files."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        stop_child(self.process, whole_session=False)
        if not self._log.closed:
            self._log.close()
        self._dir.cleanup()


def launch_engine(backend: str, model: str | os.PathLike[str], *, api_key: str | None = None,
                  start_timeout_s: float = DEFAULT_START_TIMEOUT_S, env: dict[str, str] | None = None,
                  **options: Any) -> RemoteEngine:
    """Start ``skyrl-backends serve`` for one engine in a child process and connect to it; the
    returned engine's ``teardown`` stops the process. ``options`` are ``create_engine`` keywords."""
    server = ServerProcess(backend, model, options=options, api_key=api_key, env=env)
    try:
        url = server.wait_ready(start_timeout_s)
        return connect_engine(url, api_key=api_key, wait_ready_s=start_timeout_s, _owned_server=server)
    except BaseException:
        server.stop()
        raise


__all__ = ["ServerProcess", "launch_engine"]
