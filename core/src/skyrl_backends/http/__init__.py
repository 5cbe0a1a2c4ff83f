"""The OpenAI-compatible HTTP endpoint over an engine client (``pip install 'skyrl-backends[http]'``).

    from skyrl_backends.http import create_app, BackgroundServer
    app = create_app(client, tokenizer, model_name="tiny")
    with BackgroundServer(app) as server:      # 127.0.0.1, a free port
        print(server.url)

From the command line: ``skyrl-backends serve --backend transformers --model DIR``, which also serves
the engine API (``create_engine_app``) that :mod:`skyrl_backends.remote` engines talk to.

Names are imported on first use, so that the ``serve`` command is listed (and says what to install)
where the ``http`` extra is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "APIError": "skyrl_backends.http.errors",
    "BackgroundServer": "skyrl_backends.http.server",
    "create_app": "skyrl_backends.http.app",
    "create_engine_app": "skyrl_backends.http.engine_routes",
    "serve": "skyrl_backends.http.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'skyrl_backends.http' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
