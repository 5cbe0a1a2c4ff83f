"""The OpenAI-compatible HTTP endpoint over an engine client (``pip install 'skyrl-backends[http]'``).

    from skyrl_backends.http import create_app, BackgroundServer
    app = create_app(client, tokenizer, model_name="tiny")
    with BackgroundServer(app) as server:      # 127.0.0.1, a free port
        print(server.url)

From the command line: ``skyrl-backends serve --backend transformers --model DIR``.
"""

from skyrl_backends.http.app import create_app
from skyrl_backends.http.errors import APIError
from skyrl_backends.http.server import BackgroundServer, serve

__all__ = ["APIError", "BackgroundServer", "create_app", "serve"]
