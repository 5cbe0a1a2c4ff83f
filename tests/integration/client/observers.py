"""An observer around a real engine: records which request ids reached it, with the prompts it was
given and the token ids it generated, and delegates everything.

Lets a test check routing and token ids from the engines' side instead of trusting the client's
(or the HTTP endpoint's) own account."""

from __future__ import annotations

from typing import Any


class EngineObserver:
    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.request_ids: list[str] = []
        self.prompts: list[list[int]] = []      # every prompt received, in order
        self.generated: list[list[int]] = []    # every completion's token ids, in order of completion

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request: Any) -> Any:
        self.request_ids.extend(request.request_ids)
        self.prompts.extend(list(p) for p in request.prompt_token_ids)
        output = await self._engine.generate(request)
        self.generated.extend(list(c.token_ids) for c in output)
        return output

    async def generate_stream(self, request: Any) -> Any:
        self.request_ids.extend(request.request_ids)
        self.prompts.extend(list(p) for p in request.prompt_token_ids)
        async for chunk in self._engine.generate_stream(request):
            if chunk.completion is not None:
                self.generated.append(list(chunk.completion.token_ids))
            yield chunk
