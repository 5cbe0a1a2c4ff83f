"""The trainer's handle on an engine served by ``engine_server.py`` in another process: the methods
``sync_weights``, ``sync_lora_adapter`` and ``connect_broadcast`` call (``weight_specs``,
``validate_weight_update``, ``update_named_weights``, the LoRA-from-tensors pair,
``init_weight_update_communicator``), sent as JSON over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import TensorSpec, WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync.manifest import request_to_json

SERVER = Path(__file__).with_name("engine_server.py")


class RemoteEngine:
    def __init__(self, backend: str, model: str, python: str = sys.executable, wait: bool = True,
                 env: dict[str, str] | None = None, **options: Any) -> None:
        """Start the engine process (``env`` adds to this process's environment, e.g. another
        ``CUDA_VISIBLE_DEVICES``); with ``wait=False`` call :meth:`wait_ready` later (to start several
        engines at once)."""
        self.backend = backend
        self.capabilities = Capabilities()  # the server's, once it is ready (connect_broadcast reads them)
        cmd = [python, str(SERVER), "--backend", backend, "--model", model]
        for key, value in options.items():
            cmd += ["--option", f"{key}={json.dumps(value)}"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.port = 0
        if wait:
            self.wait_ready()

    @classmethod
    def connect(cls, backend: str, port: int, capabilities: dict[str, Any]) -> RemoteEngine:
        """A handle on an engine server another process started (a trainer rank of its own)."""
        engine = cls.__new__(cls)
        engine.backend, engine.port, engine.process = backend, port, None
        engine.capabilities = Capabilities.from_dict(capabilities)
        return engine

    def wait_ready(self) -> RemoteEngine:
        # Engines may print their own lines on stdout before the server announces itself.
        for line in self.process.stdout:
            if line.startswith("READY "):
                _, port, capabilities = line.split(" ", 2)
                self.port = int(port)
                self.capabilities = Capabilities.from_dict(json.loads(capabilities))
                return self
            sys.stderr.write(line)
        raise RuntimeError(f"engine server failed to start (exit code {self.process.wait()})")

    async def _call(self, op: str, **fields: Any) -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 26)
        try:
            writer.write((json.dumps({"op": op, **fields}) + "\n").encode())
            await writer.drain()
            reply = json.loads(await reader.readline())
        finally:
            writer.close()
        if "error" in reply:
            error = reply["error"]
            if error["type"] == "WeightUpdateError":
                raise WeightUpdateError(error["problems"])
            raise RuntimeError(f"{error['type']}: {error['message']}")
        return reply["ok"]

    async def weight_specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(s), d) for n, s, d in await self._call("weight_specs")]

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        await self._call("validate", request=request_to_json(request))

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        return await self._call("update", request=request_to_json(request))

    async def init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        await self._call("init", init_info=dataclasses.asdict(init_info))

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        await self._call("validate_lora", lora_name=lora_name, lora_config=lora_config,
                         request=request_to_json(request))

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        return await self._call("load_lora", lora_name=lora_name, lora_config=lora_config,
                                request=request_to_json(request))

    async def generate(self, prompts: list[list[int]], sampling_params: dict[str, Any],
                       lora_name: str | None = None) -> list[dict[str, Any]]:
        return await self._call("generate", prompts=prompts, sampling_params=sampling_params, lora_name=lora_name)

    async def state(self) -> dict[str, Any]:
        return await self._call("state")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                asyncio.run(self._call("shutdown"))
                self.process.wait(timeout=30)
            except Exception:
                self.process.kill()
                self.process.wait()
