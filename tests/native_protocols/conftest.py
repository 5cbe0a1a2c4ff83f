"""Servers for the native-protocol tests: the engines' own servers and ``skyrl-backends serve``.

Runs in the vLLM environment (vLLM's own client code is what drives the servers). Every server is a
child process on a free loopback port, one at a time (module-scoped and parametrized):

* ``vllm-serve``: vLLM's own server, unmodified (``python -m vllm.entrypoints.openai.api_server``,
  what ``vllm serve`` runs), with the vLLM backend's ``"skyrl"`` weight-transfer engine, which vLLM
  finds through the plugin's ``vllm.general_plugins`` entry point;
* ``transformers`` and ``vllm``: ``skyrl-backends serve`` over that backend, answering vLLM's RL
  routes (``--weight-transfer-config '{"backend": "skyrl"}'``). The transformers backend lives in
  its own environment: its Python is ``$SKYRL_TRANSFORMERS_PYTHON`` (the Makefile sets it), else
  ``.venv/transformers/bin/python`` at the repository's root.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import requests

pytest_plugins = ["skyrl_backends.testing.fixtures"]

TRANSFORMERS_PYTHON_ENV = "SKYRL_TRANSFORMERS_PYTHON"
WEIGHT_TRANSFER = ["--weight-transfer-config", json.dumps({"backend": "skyrl"})]
SERVERS = ("vllm-serve", "transformers", "vllm")
START_TIMEOUT_S = 600.0
# One engine worker inside vLLM's engine-core process: one process start fewer per server.
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass
class Server:
    """A running server: its kind (one of SERVERS) and base URL, with JSON helpers."""

    kind: str
    url: str

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.url + path, params=params or None, timeout=600)

    def post(self, path: str, body: Any = None, **params: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, params=params or None, timeout=600)

    @property
    def model_name(self) -> str:
        return self.get("/v1/models").json()["data"][0]["id"]

    @property
    def is_vllm_engine(self) -> bool:
        return self.kind in ("vllm-serve", "vllm")


def transformers_python(rootdir: Path) -> str:
    path = os.environ.get(TRANSFORMERS_PYTHON_ENV) or str(rootdir / ".venv" / "transformers" / "bin" / "python")
    if not os.path.exists(path):
        pytest.fail(f"no transformers environment at {path}: build it (make .venv/transformers/.ready) or set "
                    f"{TRANSFORMERS_PYTHON_ENV}", pytrace=False)
    return path


def require_weight_transfer_entry_point() -> None:
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    if "skyrl_backend_vllm.weight_transfer:register" not in names:
        pytest.fail("vLLM cannot find the 'skyrl' weight-transfer engine: this environment predates the vLLM "
                    "backend's vllm.general_plugins entry point; rebuild it (make .venv/vllm/.ready)", pytrace=False)


def start(kind: str, model_dir: str, rootdir: Path) -> tuple[str, Any]:
    """Start a server of ``kind``; returns its URL and the process object (with ``stop()``)."""
    if kind == "vllm-serve":
        from skyrl_backends.remote.native.launch import NativeServer

        require_weight_transfer_entry_point()
        process = NativeServer("vllm", model_dir, options={"dtype": "float32", "max_model_len": 1024, "seed": 0},
                               env=SERVER_ENV)
        try:
            return process.wait_ready(START_TIMEOUT_S), process
        except BaseException:
            process.stop()
            raise
    from skyrl_backends.remote.launch import ServerProcess

    python = transformers_python(rootdir) if kind == "transformers" else sys.executable
    options = {"dtype": "float32", "seed": 0} | ({"max_model_len": 1024} if kind == "vllm" else {"device": "cpu"})
    process = ServerProcess(kind, model_dir, options=options, python=python, env=SERVER_ENV,
                            extra_args=WEIGHT_TRANSFER)
    return process.wait_ready(START_TIMEOUT_S), process


def engine_processes(process: Any) -> list[Any]:
    """The processes a started server runs beneath it (vLLM's engine core, for instance)."""
    import psutil

    return psutil.Process(process.process.pid).children(recursive=True)


def stop_and_check(process: Any, started: list[Any], kind: str) -> None:
    """Stop a server and fail if any of ``started`` outlives it by a minute (those are killed, so
    nothing is left behind for the next test)."""
    import psutil

    process.stop()
    _, alive = psutil.wait_procs(started, timeout=60)
    for leftover in alive:
        leftover.kill()
    assert not alive, f"still running after the {kind} server stopped: {[p.pid for p in alive]}"


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest, model_dir: str):
    """A server for the module's tests; stopping it afterwards must stop every process it started
    (the plain stop: test_server_processes.py checks a stop after the server was killed)."""
    url, process = start(request.param, model_dir, Path(request.config.rootpath))
    started = engine_processes(process)
    try:
        yield Server(request.param, url)
    finally:
        stop_and_check(process, started, request.param)
