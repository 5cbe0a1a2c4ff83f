"""An observer around a real engine: records which request ids reached it, delegates everything.

Lets a test check routing from the engines' side instead of trusting the client's own account."""

from __future__ import annotations

from typing import Any


class EngineObserver:
    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.request_ids: list[str] = []
        self.requests: list[Any] = []  # every GenerateRequest that reached the engine
        self.outputs: list[Any] = []  # what the engine answered to each generate call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request: Any) -> Any:
        self.request_ids.extend(request.request_ids)
        self.requests.append(request)
        output = await self._engine.generate(request)
        self.outputs.append(output)
        return output

    async def generate_stream(self, request: Any) -> Any:
        self.request_ids.extend(request.request_ids)
        self.requests.append(request)
        async for chunk in self._engine.generate_stream(request):
            yield chunk
