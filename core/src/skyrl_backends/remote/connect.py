"""Connecting to engine servers: one URL -> one :class:`~skyrl_backends.remote.RemoteEngine`.

URLs are written as SkyRL writes ``remote_inference_engine_urls`` (``"10.0.0.2:8001"``) or in full
(``"https://host:8443"``, ``"http://host:8000/skyrl/v1/engines/1"`` for one engine of a server that
runs several); a URL without a path means the server's engine API at ``/skyrl/v1``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from skyrl_backends.errors import ConfigError
from skyrl_backends.remote import wire
from skyrl_backends.remote.dialect import SkyRLDialect, WireDialect
from skyrl_backends.remote.engine import RemoteEngine
from skyrl_backends.remote.transport import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_RETRIES,
    HttpTransport,
)

API_KEY_ENV = "SKYRL_BACKENDS_API_KEY"
DEFAULT_WAIT_READY_S = 60.0
DIALECTS: dict[str, type[WireDialect]] = {SkyRLDialect.name: SkyRLDialect}
# Engines' own, unmodified servers, driven through their HTTP APIs (an InferenceEngine, not a RemoteEngine).
NATIVE_DIALECTS = ("vllm", "sglang")


def normalize_url(url: str, field: str = "remote_inference_engine_urls") -> str:
    """``url`` with a scheme and the engine API's path (``host:port`` -> ``http://host:port/skyrl/v1``)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(field, f"got {url!r}; give an engine server's address, e.g. 10.0.0.2:8000")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(field, f"{url!r} has scheme {parts.scheme!r}; use http or https")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(field, f"{url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(field, f"{url!r} names no host; write host:port, e.g. 10.0.0.2:8000")
    if port is None and parts.scheme == "http" and "://" not in url:
        raise ConfigError(field, f"{url!r} names no port; write host:port, e.g. {parts.hostname}:8000")
    path = parts.path.rstrip("/") or wire.API_PREFIX
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def connect_engine(url: str, *, api_key: str | None = None, wait_ready_s: float = DEFAULT_WAIT_READY_S,
                   retries: int = DEFAULT_RETRIES, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
                   connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, dialect: str = SkyRLDialect.name,
                   _owned_server: object = None) -> RemoteEngine:
    """A :class:`RemoteEngine` for the engine server at ``url``.

    ``api_key`` (default ``$SKYRL_BACKENDS_API_KEY``) is sent as ``Authorization: Bearer``. A server
    still starting or loading its engine is waited for up to ``wait_ready_s`` seconds. ``retries``
    and ``heartbeat_timeout_s`` bound how long a lost server takes to be reported
    (:class:`~skyrl_backends.errors.EngineDeadError`, which the engine client fails over). ``dialect``
    names the server protocol (``"skyrl"``: ``skyrl-backends serve``; ``"vllm"``, ``"sglang"``: the
    engine's own server, see :mod:`skyrl_backends.remote.native`)."""
    if dialect in NATIVE_DIALECTS:  # an engine's own server: skyrl_backends.remote.native
        from skyrl_backends.remote.native import connect_server

        return connect_server(url, dialect, api_key=api_key, wait_ready_s=wait_ready_s)
    if dialect not in DIALECTS:
        raise ConfigError("dialect", f"got {dialect!r}; known: {sorted([*DIALECTS, *NATIVE_DIALECTS])}")
    base = normalize_url(url)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    transport = HttpTransport(base, api_key, connect_timeout_s=connect_timeout_s,
                              heartbeat_timeout_s=heartbeat_timeout_s, retries=retries)
    speaker = DIALECTS[dialect](transport)
    description = speaker.describe(wait_ready_s)
    same_host = speaker.probe_same_host()
    return RemoteEngine(speaker, description, same_host=same_host, url=base, owned_server=_owned_server)


__all__ = ["API_KEY_ENV", "DEFAULT_WAIT_READY_S", "DIALECTS", "connect_engine", "normalize_url"]
