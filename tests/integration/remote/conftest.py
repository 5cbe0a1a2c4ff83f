"""Fixtures for the remote engine on a real engine: the transformers backend served by the engine API
on a loopback port (``served``), with an observer that records what reached the engine, and remote
engines connected to it directly or through a proxy that breaks connections on demand.

The server and its engine run on a loop thread of their own (as in ``skyrl-backends serve``); each
test drives its remote engine from its own event loop (``asyncio.run``), like a trainer would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "client"))  # observers.EngineObserver
pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

API_KEY = "remote-test-key"
ENGINE_OPTIONS = {"dtype": "float32", "device": "cpu", "enable_lora": True}


class Served:
    """A real engine behind the engine API on loopback."""

    def __init__(self, model_dir: str) -> None:
        import skyrl_backends as sb
        from observers import EngineObserver
        from skyrl_backends.client.loop_thread import LoopThread
        from skyrl_backends.http import BackgroundServer
        from skyrl_backends.http.engine_operations import OperationLog
        from skyrl_backends.http.engine_routes import create_engine_app

        self.loop = LoopThread("engine-server")
        self.engine = self.loop.call(sb.create_engine, "transformers", model=model_dir, **ENGINE_OPTIONS)
        self.observed = EngineObserver(self.engine)
        self.log = OperationLog(orphan_grace_s=0.5)
        self.app = create_engine_app(self.observed, api_key=API_KEY, log=self.log)
        self.server = BackgroundServer(self.app, loop=self.loop).start(timeout_s=120)  # a loaded CI machine
        self.url = self.server.url

    def run(self, coro, timeout_s: float = 120.0):
        """Drive the served engine itself, on its own loop (for the in-process reference)."""
        return self.loop.run(coro, timeout_s)

    def close(self) -> None:
        self.server.stop()
        self.loop.run(self.engine.teardown())
        self.loop.stop()


@pytest.fixture(scope="module")
def served(model_dir):
    server = Served(model_dir)
    yield server
    server.close()


@pytest.fixture
def remote(served):
    from skyrl_backends.remote import connect_engine

    engine = connect_engine(served.url, api_key=API_KEY, retries=2)
    yield engine
    import asyncio

    asyncio.run(engine.teardown())


@pytest.fixture
def proxy(served):
    from flaky_proxy import FlakyProxy

    host, port = served.server.host, served.server.port
    flaky = FlakyProxy(host, port)
    yield flaky
    flaky.close()
