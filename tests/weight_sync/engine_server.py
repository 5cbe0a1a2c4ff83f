"""A real engine in its own OS process, driven over a loopback socket with JSON lines.

Test support for the cross-process weight-sync tests: the trainer (the test process) and the engine
share nothing but the socket, the shared-memory segments and the broadcast group. Requests arrive as
JSON and go through ``request_from_json``; nothing is unpickled.

    python engine_server.py --backend transformers --model DIR [--option key=value ...]

prints ``READY <port> <capabilities as JSON>`` once the engine is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import skyrl_backends as sb
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightSyncInitInfo
from skyrl_backends.weight_sync.manifest import request_from_json


class EngineServer:
    def __init__(self, engine: sb.InferenceEngine) -> None:
        self.engine = engine
        self.stopped = asyncio.Event()

    async def op_weight_specs(self, msg: dict[str, Any]) -> Any:
        return [[s.name, list(s.shape), s.dtype] for s in (await self.engine.weight_specs()).values()]

    async def op_validate(self, msg: dict[str, Any]) -> Any:
        await self.engine.validate_weight_update(request_from_json(msg["request"]))

    async def op_update(self, msg: dict[str, Any]) -> Any:
        return await self.engine.update_named_weights(request_from_json(msg["request"]))

    async def op_init(self, msg: dict[str, Any]) -> Any:
        await self.engine.init_weight_update_communicator(WeightSyncInitInfo(**msg["init_info"]))

    async def op_validate_lora(self, msg: dict[str, Any]) -> Any:
        await self.engine.validate_lora_adapter_from_tensors(msg["lora_name"], msg["lora_config"],
                                                             request_from_json(msg["request"]))

    async def op_load_lora(self, msg: dict[str, Any]) -> Any:
        return await self.engine.load_lora_adapter_from_tensors(msg["lora_name"], msg["lora_config"],
                                                                request_from_json(msg["request"]))

    async def op_generate(self, msg: dict[str, Any]) -> Any:
        out = await self.engine.generate(msg["prompts"], msg["sampling_params"], lora_name=msg.get("lora_name"))
        return [{"token_ids": c.token_ids, "weight_version": c.weight_version, "logprobs": c.logprobs,
                 "lora_version": c.lora_version} for c in out]

    async def op_state(self, msg: dict[str, Any]) -> Any:
        return {"weight_version": self.engine.weight_version, "capabilities": self.engine.capabilities.to_dict()}

    async def op_shutdown(self, msg: dict[str, Any]) -> Any:
        self.stopped.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            try:
                msg = json.loads(line)
                result = {"ok": await getattr(self, "op_" + msg["op"])(msg)}
            except WeightUpdateError as exc:
                result = {"error": {"type": "WeightUpdateError", "problems": exc.problems}}
            except Exception as exc:  # reported to the caller, who re-raises it
                result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
            writer.write((json.dumps(result) + "\n").encode())
            await writer.drain()
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--model", required=True)
    parser.add_argument("--option", action="append", default=[], help="key=value (value parsed as JSON if it can be)")
    args = parser.parse_args()
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    engine = sb.create_engine(args.backend, model=args.model, **options)
    server = EngineServer(engine)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, limit=1 << 26)
    print("READY", listener.sockets[0].getsockname()[1], json.dumps(engine.capabilities.to_dict()), flush=True)
    await server.stopped.wait()
    listener.close()
    await engine.teardown()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
