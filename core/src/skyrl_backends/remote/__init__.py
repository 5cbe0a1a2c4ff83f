"""Engines on other processes and machines, behind the same engine protocol (``pip install
'skyrl-backends[remote]'``).

    from skyrl_backends.remote import connect_engine
    engine = connect_engine("10.0.0.2:8000", api_key=key)     # a server started with `skyrl-backends serve`
    out = await engine.generate([[1, 2, 3]], {"max_generate_length": 64})

or from configuration, as SkyRL spells it: ``run_engines_locally: false`` with
``remote_inference_engine_urls: [...]`` (``skyrl_backends.create_engines``). :mod:`.wire` is the JSON
format both sides share (the server imports it without httpx), :mod:`.dialect` how calls are spoken
to a kind of server, :mod:`.transport` retries and timeouts, :mod:`.launch` a server in a child
process. Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RemoteEngine": "skyrl_backends.remote.engine",
    "transport_capabilities": "skyrl_backends.remote.engine",
    "ServerDescription": "skyrl_backends.remote.dialect",
    "SkyRLDialect": "skyrl_backends.remote.dialect",
    "WireDialect": "skyrl_backends.remote.dialect",
    "connect_engine": "skyrl_backends.remote.connect",
    "normalize_url": "skyrl_backends.remote.connect",
    "ServerProcess": "skyrl_backends.remote.launch",
    "launch_engine": "skyrl_backends.remote.launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'skyrl_backends.remote' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
