"""A test double for unit tests of the client's routing logic (never a backend stand-in).

``RecordingEngineDouble`` has the engine API the client calls (generate, abort, pause...), records
every request it receives, and "generates" one token per ``step_s`` from a fixed rule over the
context, so a sequence resumed from any point continues exactly as it would have. It can be killed
(calls raise EngineDeadError) or hung (calls never answer) to exercise failover.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import EngineDeadError, WeightUpdateError
from skyrl_backends.stopping import StopStringMatcher
from skyrl_backends.types import Completion, GenerateOutput, GenerateRequest, WeightUpdateRequest

EOS = 2


def next_token(context: list[int]) -> int:
    """The double's model: depends only on the context, never on where a request was cut."""
    return (sum(context[-3:]) * 31 + len(context)) % 26 + 3


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + (t - 3) % 26) for t in ids if t != EOS)


@dataclass
class RecordingEngineDouble:
    name: str
    step_s: float = 0.001
    native_pause: bool = False
    abortable: bool = True
    eos_at: int | None = None  # emit EOS once the response has this many tokens
    requests: list[GenerateRequest] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    dead: bool = False
    hung: bool = False
    weights: dict[str, float] = field(default_factory=lambda: {"w": 0.0})
    closed: bool = False
    backend: str = "routing-double"
    weight_version: int = 0

    def __post_init__(self) -> None:
        # A native pause here stands for an engine that keeps requests across updates with exact
        # per-token versions (token_versions), as the client requires to keep them natively.
        self.capabilities = Capabilities(abort=self.abortable, native_pause=self.native_pause, stop_strings=True,
                                         min_new_tokens=True, weight_sync_strategies=("tensors",),
                                         token_versions=self.native_pause)
        self._paused = False
        self._aborted: set[str] = set()
        self._abort_all = 0

    @property
    def received_request_ids(self) -> list[str]:
        return [rid for r in self.requests for rid in r.request_ids]

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError(f"{self.name} is dead")

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        self._check_alive()
        self.requests.append(request)
        if self.hung:
            await asyncio.Event().wait()
        params = request.sampling_params
        n = params.n
        ids = list(request.request_ids) if n == 1 else [f"{r}-{j}" for r in request.request_ids for j in range(n)]
        prompts = [p for p in request.prompt_token_ids for _ in range(n)]
        epoch = self._abort_all
        results = await asyncio.gather(*(self._one(rid, p, params, epoch) for rid, p in zip(ids, prompts)))
        self._check_alive()
        return GenerateOutput(list(results))

    async def _one(self, rid: str, prompt: list[int], params: Any, epoch: int) -> Completion:
        tokens: list[int] = []
        matcher = StopStringMatcher(params.stop, decode)
        while True:
            if rid in self._aborted or self._abort_all != epoch:
                self._aborted.discard(rid)
                return Completion(tokens, "abort", request_id=rid, text=decode(tokens))
            if self.dead:
                raise EngineDeadError(f"{self.name} died")
            if self._paused:
                await asyncio.sleep(self.step_s)
                continue
            if self.eos_at is not None and len(tokens) >= max(self.eos_at, params.min_new_tokens) \
                    and not params.ignore_eos:
                tokens.append(EOS)
                return Completion(tokens, "stop", request_id=rid, text=decode(tokens))
            tokens.append(next_token(prompt + tokens))
            found = matcher.feed(tokens)
            if found:
                return Completion(tokens, "stop", stop_reason=found[0], request_id=rid, text=found[1])
            if len(tokens) >= params.max_generate_length:
                return Completion(tokens, "length", request_id=rid, text=decode(tokens))
            await asyncio.sleep(self.step_s)

    async def abort(self, request_ids: list[str] | None = None) -> None:
        self._check_alive()
        self.calls.append(("abort", request_ids))
        if request_ids is None:
            self._abort_all += 1
        else:
            self._aborted.update(request_ids)

    async def pause_generation(self, mode: str = "keep", *, recompute: bool = False) -> None:
        self.calls.append(("pause", mode))
        if mode == "abort":
            self._abort_all += 1
        self._paused = mode == "keep"

    async def resume_generation(self) -> None:
        self.calls.append(("resume", None))
        self._paused = False

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        bad = {n: "no such parameter" for n in request.names if n not in self.weights}
        if bad:
            raise WeightUpdateError(bad)

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        self._check_alive()
        self.calls.append(("update", request.names))
        for name, value in zip(request.names, request.payload):
            self.weights[name] = value
        self.weight_version += 1
        return self.weight_version

    async def sleep(self, tags: Any = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        self.calls.append(("sleep", (tags, level)))

    async def wake_up(self, tags: Any = None) -> None:
        self.calls.append(("wake_up", tags))

    async def teardown(self) -> None:
        self.calls.append(("teardown", None))
        self.closed = True
