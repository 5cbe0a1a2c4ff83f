"""Engines behind an engine's own, unmodified server: ``vllm serve`` or SGLang's ``launch_server``.

    from skyrl_backends.remote.native import connect_server
    engine = connect_server("http://10.0.0.2:8000", "vllm")      # or "sglang"
    out = await engine.generate([[1, 2, 3]], {"max_generate_length": 64, "logprobs": 0})

or ``connect_engine(url, dialect="vllm")``. The engine is the
:class:`~skyrl_backends.engine.InferenceEngine` facade over a backend whose hooks speak the server's
HTTP API (:mod:`.engine`, :mod:`.vllm`, :mod:`.sglang`): every guarantee of the engine API holds on
this side of the wire (canonical sampling checked before anything is sent, ``n`` expanded with
per-sample seeds, state checks, weight updates validated against the checkpoint and atomic, a weight
version on every token, the three pause modes), and the engine client routes, pauses and fails over
such engines like any other. :func:`~skyrl_backends.remote.native.launch.launch_server` starts a
server and connects to it. Servers deployed with ``skyrl-backends serve`` are reached with
:func:`skyrl_backends.remote.connect_engine` instead.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError

PROTOCOLS = ("vllm", "sglang")
SAME_HOST_ENV = "SKYRL_SERVER_SAME_HOST"


def server_url(url: str, field: str = "remote_inference_engine_urls") -> str:
    """``url`` as scheme://host:port (``host:port`` -> ``http://host:port``); an engine's own server
    has no path prefix."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(field, f"got {url!r}; give the server's address, e.g. 10.0.0.2:8000")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(field, f"{url!r} is not an http(s) address with a host, e.g. 10.0.0.2:8000")
    return f"{parts.scheme}://{parts.netloc}"


def is_same_host(url: str) -> bool:
    """Whether a server at ``url`` is on this machine (a loopback address), so that shared memory
    carries weights to it. ``$SKYRL_SERVER_SAME_HOST=1`` (or 0) says so for other addresses."""
    override = os.environ.get(SAME_HOST_ENV)
    if override is not None:
        return override not in ("", "0", "false")
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_server(url: str, protocol: str, *, api_key: str | None = None, wait_ready_s: float = 60.0,
                   same_host: bool | None = None) -> Any:
    """An engine for the ``protocol`` server (``"vllm"`` or ``"sglang"``) at ``url``, waiting up to
    ``wait_ready_s`` for one still loading its model. ``same_host`` (default: the URL is a loopback
    address) enables the weight-sync strategies that need the trainer on the server's machine."""
    from skyrl_backends.engine import InferenceEngine
    from skyrl_backends.remote.native.http import ServerHTTP

    if protocol == "vllm":
        from skyrl_backends.remote.native import vllm as speaker
    elif protocol == "sglang":
        from skyrl_backends.remote.native import sglang as speaker  # type: ignore[no-redef]
    else:
        raise ConfigError("dialect", f"got {protocol!r}; an engine's own server speaks one of {list(PROTOCOLS)}")
    base = server_url(url)
    http = ServerHTTP(base, api_key)
    info = speaker.describe(http, wait_ready_s, is_same_host(base) if same_host is None else same_host)
    impl = speaker.ENGINE(http, info)
    config = GeneratorConfig(backend=f"{protocol}-server", model=info.model, max_model_len=info.max_model_len,
                             enable_lora=info.capabilities.lora)
    engine = InferenceEngine(f"{protocol}-server", impl, config, info.capabilities,
                             speaker.Translation(info.capabilities.max_top_logprobs))
    # The facade numbers versions from the server's own label (a server another trainer updated).
    engine.weight_version = info.weight_version
    return engine


def __getattr__(name: str) -> Any:
    if name == "launch_server":
        from skyrl_backends.remote.native.launch import launch_server

        return launch_server
    raise AttributeError(f"module 'skyrl_backends.remote.native' has no attribute {name!r}")


__all__ = ["PROTOCOLS", "SAME_HOST_ENV", "connect_server", "is_same_host", "launch_server", "server_url"]
