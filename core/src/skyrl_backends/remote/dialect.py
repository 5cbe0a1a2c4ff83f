"""Wire dialects: how the remote engine's calls are spoken to one kind of server.

:class:`~skyrl_backends.remote.RemoteEngine` owns the engine semantics every remote engine shares
(request ids, in-flight and state bookkeeping, aborts that cross a generation on the network, weight
transfers when trainer and server share a machine); a :class:`WireDialect` owns one server protocol:
which route each call takes and how its values are encoded. :class:`SkyRLDialect` speaks the engine
API of ``skyrl-backends serve`` (:mod:`skyrl_backends.http.engine_routes`). A dialect for another
server (vLLM's or SGLang's own HTTP servers) implements the same methods against that server's routes
and declares, through :meth:`WireDialect.describe`, the capabilities that server really offers.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, RemoteEngineError, WeightUpdateError
from skyrl_backends.remote import wire
from skyrl_backends.remote.transport import HttpTransport
from skyrl_backends.types import (
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    StreamChunk,
    TensorSpec,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)
from skyrl_backends.weight_sync.layout_refs import INFO_FIELD as LAYOUTS_INFO_FIELD
from skyrl_backends.weight_sync.layout_refs import SentLayouts
from skyrl_backends.weight_sync.manifest import request_to_json


@dataclass
class RemoteState:
    """What the server last said about its engine (the remote engine's mirror of it)."""

    weight_version: int = 0
    asleep: tuple[str, ...] = ()
    weights_loaded: bool = True
    paused: bool = False
    pause_mode: str | None = None
    closed: bool = False
    lora_adapters: dict[str, str] = field(default_factory=dict)
    lora_versions: dict[str, int] = field(default_factory=dict)
    inflight: int = 0

    @classmethod
    def from_json(cls, value: Any) -> RemoteState:
        value = value if isinstance(value, dict) else {}
        mode = value.get("pause_mode")
        return cls(weight_version=int(value.get("weight_version", 0)), asleep=tuple(value.get("asleep", ())),
                   weights_loaded=bool(value.get("weights_loaded", True)), paused=bool(value.get("paused", False)),
                   pause_mode=mode if isinstance(mode, str) else None,
                   closed=bool(value.get("closed", False)), lora_adapters=dict(value.get("lora_adapters", {})),
                   lora_versions={str(k): int(v) for k, v in dict(value.get("lora_versions") or {}).items()},
                   inflight=int(value.get("inflight", 0)))


@dataclass(frozen=True)
class ServerDescription:
    """What an engine server says about its engine when a remote engine connects."""

    backend: str
    capabilities: Capabilities
    parallel_sizes: ParallelSizes
    engine_version: str | None
    model: str | None
    state: RemoteState
    distribution: str | None = None
    # The server engine's generator config, less keys and engine keyword arguments (None: not described).
    config: GeneratorConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a generation as the server reports it: ``accepted`` (the engine has the request,
    so an abort reaches it), ``chunk`` (a :class:`StreamChunk`) or ``result`` (the output; None for a
    stream)."""

    kind: str
    chunk: StreamChunk | None = None
    output: GenerateOutput | None = None


class WireDialect(abc.ABC):
    """One server protocol. Every method may raise the engine's errors (rebuilt from the server's
    answer) or :class:`~skyrl_backends.errors.EngineDeadError` when the server cannot be reached."""

    name: str = ""
    transport: HttpTransport

    @abc.abstractmethod
    def describe(self, wait_ready_s: float) -> ServerDescription:
        """The server's engine (synchronous: called while the engine is created), waiting up to
        ``wait_ready_s`` for a server that is starting."""

    def probe_same_host(self) -> bool:
        """Whether the server maps this process's shared memory (False when the dialect cannot tell)."""
        return False

    @abc.abstractmethod
    def generate(self, request: GenerateRequest, stream: bool, key: str) -> AsyncIterator[GenerationEvent]:
        """The events of one generation (an async generator)."""

    @abc.abstractmethod
    async def abort(self, request_ids: Sequence[str] | None, pending_ids: Sequence[str]) -> RemoteState:
        """Abort ``request_ids`` (None: every request); ``pending_ids`` were sent and not yet accepted."""

    @abc.abstractmethod
    async def call(self, method: str, arguments: dict[str, Any], key: str) -> tuple[Any, RemoteState]:
        """A control call of the Engine API by method name and keyword arguments: its result and the
        engine's state after it."""

    @abc.abstractmethod
    async def weight_specs(self) -> dict[str, TensorSpec]: ...

    @abc.abstractmethod
    async def state(self) -> RemoteState: ...

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None:
        await self.transport.aclose()


def _encode_argument(name: str, value: Any) -> Any:
    if isinstance(value, WeightSyncInitInfo):
        return wire.init_info_to_json(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, WeightSyncInitInfo) for v in value):
        return [wire.init_info_to_json(v) for v in value]
    if isinstance(value, WeightUpdateRequest):
        return request_to_json(value)
    if isinstance(value, tuple):
        return list(value)
    return value


class SkyRLDialect(WireDialect):
    """The engine API of ``skyrl-backends serve`` (JSON, NDJSON events, idempotency keys)."""

    name = wire.DIALECT

    def __init__(self, transport: HttpTransport) -> None:
        self.transport = transport
        # What the server keeps of the weight-update layouts it was sent (None: a server that keeps
        # none, every request in full); set by describe.
        self._layouts: SentLayouts | None = None

    def describe(self, wait_ready_s: float) -> ServerDescription:
        url = self.transport.base_url
        try:
            info = self.transport.get_sync("/info", wait_ready_s)
        except RemoteEngineError as exc:
            if exc.status == 404:
                raise ConfigError("remote_inference_engine_urls", f"{url} serves no skyrl engine API (HTTP 404): "
                                                                  f"start the server with `skyrl-backends serve` "
                                                                  f"(without --no-engine-api)") from None
            raise
        if not isinstance(info, dict) or info.get("dialect") != wire.DIALECT:
            raise ConfigError("remote_inference_engine_urls", f"{url} does not serve the skyrl engine API "
                                                              f"(got {str(info)[:200]})")
        if info.get("wire_version") != wire.WIRE_VERSION:
            raise ConfigError("remote_inference_engine_urls", f"{url} speaks wire version "
                                                              f"{info.get('wire_version')}; this side speaks "
                                                              f"{wire.WIRE_VERSION}: install matching skyrl-backends "
                                                              f"versions")
        self._layouts = SentLayouts() if info.get(LAYOUTS_INFO_FIELD) else None
        return ServerDescription(
            backend=info["backend"], capabilities=wire.capabilities_from_json(info["capabilities"]),
            parallel_sizes=wire.parallel_sizes_from_json(info.get("parallel_sizes", {})),
            engine_version=info.get("engine_version"), model=info.get("model"),
            state=RemoteState.from_json(info.get("state")), distribution=info.get("distribution"),
            config=wire.config_from_json(info.get("config")),
            extra={k: info[k] for k in ("engine_index", "num_engines") if k in info})

    def probe_same_host(self) -> bool:
        from skyrl_backends.remote.same_host import Probe

        try:
            with Probe() as probe:
                answer = self.transport.post_sync("/host/probe", {"segment": probe.name})
                return probe.matches(answer.get("content") if isinstance(answer, dict) else None)
        except OSError:  # no shared memory here (a sandbox): nothing can be shared
            return False

    async def generate(self, request: GenerateRequest, stream: bool, key: str) -> AsyncIterator[GenerationEvent]:
        body = {**wire.generate_request_to_json(request), "stream": stream}
        async for event in self.transport.events(wire.POST_OPERATIONS["generate"], body, key):
            kind = event["event"]
            if kind == "chunk":
                yield GenerationEvent("chunk", chunk=wire.chunk_from_json(event["chunk"]))
            elif kind == "result":
                result = event.get("result")
                yield GenerationEvent("result", output=None if result is None else wire.output_from_json(result))
            else:
                yield GenerationEvent(kind)

    async def abort(self, request_ids: Sequence[str] | None, pending_ids: Sequence[str]) -> RemoteState:
        body = {"request_ids": None if request_ids is None else list(request_ids), "pending_ids": list(pending_ids)}
        event = await self.transport.call(wire.POST_OPERATIONS["abort"], body)
        return RemoteState.from_json(event.get("state"))

    async def call(self, method: str, arguments: dict[str, Any], key: str) -> tuple[Any, RemoteState]:
        request = arguments.get("request")
        if self._layouts is None or not isinstance(request, WeightUpdateRequest):
            return self._result(await self._post(method, arguments, key))
        # A weight update's layout goes in full once, then by id (layout_refs); a server that no
        # longer knows the id (it restarted) refuses it by name, before applying anything, and gets
        # the request in full again at once, under a key of its own.
        encoded, layout_id = self._layouts.to_json(request)
        try:
            event = await self._post(method, {**arguments, "request": encoded}, key)
        except WeightUpdateError as exc:
            if not self._layouts.refused(layout_id, exc):
                raise
            encoded, layout_id = self._layouts.to_json(request)  # in full now
            event = await self._post(method, {**arguments, "request": encoded}, f"{key}-in-full")
        self._layouts.taken(layout_id)
        return self._result(event)

    async def _post(self, method: str, arguments: dict[str, Any], key: str) -> dict[str, Any]:
        """The call's arguments as JSON (a request encoded already passes as it is), posted."""
        body = {name: _encode_argument(name, value) for name, value in arguments.items()}
        return await self.transport.call(wire.POST_OPERATIONS[method], body, key)

    @staticmethod
    def _result(event: dict[str, Any]) -> tuple[Any, RemoteState]:
        return event.get("result"), RemoteState.from_json(event.get("state"))

    async def weight_specs(self) -> dict[str, TensorSpec]:
        return wire.specs_from_json((await self.transport.get("/weights/specs"))["specs"])

    async def state(self) -> RemoteState:
        return RemoteState.from_json(await self.transport.get("/state"))

    async def health(self) -> dict[str, Any]:
        return await self.transport.get("/health")


__all__ = ["GenerationEvent", "RemoteState", "ServerDescription", "SkyRLDialect", "WireDialect"]
