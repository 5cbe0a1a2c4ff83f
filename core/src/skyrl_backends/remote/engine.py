"""RemoteEngine: an engine served on another process or machine, behind the engine protocol.

A trainer holds it as it would hold an in-process engine (same calls, same types, same exception
classes) and so does :class:`~skyrl_backends.client.InferenceEngineClient`, which routes over it,
pauses it and fails over from it like any other engine. Create one with
:func:`~skyrl_backends.remote.connect_engine` (or ``create_engine`` with ``run_engines_locally:
false``)::

    engine = connect_engine("http://10.0.0.2:8000", api_key=key)
    out = await engine.generate([[1, 2, 3]], {"max_generate_length": 64, "logprobs": 0})

What the engine semantics need beyond the wire (:mod:`skyrl_backends.remote.dialect` speaks it):

* **Capabilities are the server's**, less what cannot cross this connection: the ``tensors`` and
  ``shared_memory`` weight-sync strategies (and ``cuda_ipc``) need a trainer on the server's machine,
  which the remote engine checks when it connects (:mod:`skyrl_backends.remote.same_host`). There,
  ``update_named_weights`` and ``load_lora_adapter_from_tensors`` with in-process tensors send them
  through shared memory, so code written for a local engine works unchanged; elsewhere weights and
  adapters travel by broadcast (``connect_broadcast``). The same holds for the strategies of
  ``lora_from_tensors``.
* **State is mirrored**: ``weight_version``, ``asleep_tags``, ``weights_loaded``, ``lora_adapters``,
  ``lora_versions``, ``paused`` and ``pause_mode`` are what the server said after the last call
  (``await engine.refresh()`` asks again); ``num_inflight`` counts this engine's requests the server
  has accepted; ``config`` is the server engine's generator config, less its keys.
* **Aborts cannot miss**: an abort naming a request still on its way to the server is remembered
  there and applied when the request arrives.
* **Teardown closes the connection**; the server and its engine keep running for other callers,
  unless this engine started the server (:func:`~skyrl_backends.remote.launch_engine`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skyrl_backends import capabilities as caps
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.engine import sample_request_ids
from skyrl_backends.errors import (
    EngineClosedError,
    EngineDeadError,
    EngineStateError,
    SkyRLBackendsError,
    WeightUpdateError,
)
from skyrl_backends.protocols import Prompts, SamplingInput
from skyrl_backends.remote.dialect import RemoteState, ServerDescription, WireDialect
from skyrl_backends.types import (
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    PauseMode,
    StreamChunk,
    TensorSpec,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)
from skyrl_backends.weight_sync.delivery import check_delivered, payload_pairs

# Strategies that pass weights through memory both processes map: only with a trainer on the server's host.
SAME_HOST_STRATEGIES: tuple[str, ...] = ("tensors", "shared_memory", "cuda_ipc")


def transport_capabilities(server: Capabilities, same_host: bool) -> Capabilities:
    """What a remote engine offers: the server's capabilities, with the strategies this connection
    can carry for weight updates and for LoRA adapters sent as tensors (in-process ``tensors``
    travel through shared memory on the same host)."""
    return dataclasses.replace(server,
                               weight_sync_strategies=_carried(server.weight_sync_strategies, same_host),
                               lora_from_tensors=_carried(server.lora_from_tensors, same_host))


def _carried(strategies: Sequence[str], same_host: bool) -> tuple[str, ...]:
    offered = []
    for strategy in strategies:
        if strategy == "tensors":
            continue  # offered below when shared memory carries it
        if strategy in SAME_HOST_STRATEGIES and not same_host:
            continue
        offered.append(strategy)
    if same_host and "shared_memory" in strategies:
        offered.insert(0, "tensors")
    return tuple(offered)


@dataclass(frozen=True)
class _TensorCalls:
    """The two calls that deliver tensors to the server's engine, and what in-process tensors need
    of the connection."""

    validate: str
    apply: str
    tensors: caps.Requirement


_WEIGHTS = _TensorCalls("validate_weight_update", "update_named_weights", caps.weight_sync("tensors"))
_LORA = _TensorCalls("validate_lora_adapter_from_tensors", "load_lora_adapter_from_tensors",
                     caps.lora_from_tensors_by("tensors"))


class RemoteEngine:
    """An engine behind an engine server; see the module docstring."""

    def __init__(self, dialect: WireDialect, description: ServerDescription, *, same_host: bool,
                 url: str, owned_server: Any = None) -> None:
        self.url = url
        self._dialect = dialect
        self.description = description
        self.backend = description.backend
        self.server_capabilities = description.capabilities
        self.config: GeneratorConfig | None = description.config
        self.same_host = same_host
        self.capabilities = transport_capabilities(description.capabilities, same_host)
        self._state = description.state
        self.weight_version = description.state.weight_version
        self._closed = False
        self._owned_server = owned_server
        self._accepted: dict[str, int] = {}  # call key -> sequences the server accepted
        self._pending: dict[str, list[str]] = {}  # call key -> sample ids sent, not yet accepted
        self._specs: dict[str, TensorSpec] | None = None
        self._tensor_sender: Any = None
        self._tensor_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<RemoteEngine {self.url} backend={self.backend!r} version={self.weight_version}>"

    # -- what the engine is -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Torn down here, or the server said its engine was torn down."""
        return self._closed or self._state.closed

    @property
    def asleep_tags(self) -> frozenset[str]:
        return frozenset(self._state.asleep)

    @property
    def weights_loaded(self) -> bool:
        return self._state.weights_loaded

    @property
    def paused(self) -> bool:
        return self._state.paused

    @property
    def pause_mode(self) -> str | None:
        """The mode of the server engine's current pause (None: not paused)."""
        return self._state.pause_mode

    @property
    def lora_adapters(self) -> dict[str, str]:
        return dict(self._state.lora_adapters)

    @property
    def lora_versions(self) -> dict[str, int]:
        """The version of each loaded adapter (stamped on its completions as ``lora_version``)."""
        return dict(self._state.lora_versions)

    @property
    def num_inflight(self) -> int:
        return sum(self._accepted.values())

    @property
    def dialect(self) -> str:
        return self._dialect.name

    def parallel_sizes(self) -> ParallelSizes:
        return self.description.parallel_sizes

    def engine_version(self) -> str | None:
        return self.description.engine_version

    async def refresh(self) -> RemoteState:
        """Ask the server for its engine's state (the mirror is otherwise as of the last call)."""
        self._check_open()
        self._mirror(await self._dialect.state())
        return self._state

    async def health(self) -> dict[str, Any]:
        return await self._dialect.health()

    def _mirror(self, state: RemoteState) -> None:
        self._state = state
        self.weight_version = state.weight_version

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError()

    # -- generation ---------------------------------------------------------------------------------
    async def generate(self, request: Prompts, sampling_params: SamplingInput = None,
                       **request_fields: Any) -> GenerateOutput:
        """Token ids in, completions out, prompt-major; as ``InferenceEngine.generate``."""
        request = GenerateRequest.coerce(request, sampling_params, request_fields)
        self._check_open()
        output: GenerateOutput | None = None
        async for event in self._events(request, stream=False):
            if event.kind == "result":
                output = event.output
        if output is None:  # pragma: no cover - the transport returns only after a result
            raise EngineStateError(f"engine server {self.url} ended a generation without its output")
        return output

    async def generate_stream(self, request: Prompts, sampling_params: SamplingInput = None,
                              **request_fields: Any) -> AsyncIterator[StreamChunk]:
        """Chunks as the server's engine produces them; leaving the loop early aborts what still runs,
        as on a local engine."""
        request = GenerateRequest.coerce(request, sampling_params, request_fields)
        self._check_open()
        ids = sample_request_ids(request)
        finished: set[int] = set()
        events = self._events(request, stream=True)
        failed = False
        try:
            async for event in events:
                if event.kind == "chunk" and event.chunk is not None:
                    if event.chunk.completion is not None:
                        finished.add(event.chunk.index)
                    yield event.chunk
        except Exception:
            failed = True  # the server's error (or its absence) ends the stream; nothing left to abort here
            raise
        finally:
            await events.aclose()
            unfinished = [rid for i, rid in enumerate(ids) if i not in finished]
            if unfinished and not failed and self.capabilities.abort and not self._closed:
                try:  # the caller left early: end what still runs, as a local engine does
                    await self.abort(unfinished)
                except Exception:  # the server may be gone: its own orphan timeout then ends them
                    pass

    async def _events(self, request: GenerateRequest, stream: bool) -> AsyncIterator[Any]:
        key = uuid.uuid4().hex
        ids = sample_request_ids(request)
        self._pending[key] = ids
        try:
            async for event in self._dialect.generate(request, stream, key):
                if event.kind == "accepted" and key in self._pending:
                    del self._pending[key]
                    self._accepted[key] = len(ids)
                yield event
        finally:
            self._pending.pop(key, None)
            self._accepted.pop(key, None)

    async def abort(self, request_ids: Sequence[str] | None = None) -> None:
        """Abort requests (None: all the server's engine runs); their callers get partial output with
        finish reason ``"abort"``. A request still on its way is aborted when it arrives."""
        self._check_open()
        ids = list(request_ids) if request_ids is not None else None
        pending = [rid for sent in self._pending.values() for rid in sent] if ids is None else []
        self._mirror(await self._dialect.abort(ids, pending))

    async def pause_generation(self, mode: PauseMode = "keep", *, recompute: bool = False) -> None:
        """Pause the server's engine in ``mode`` (``"abort"``, ``"wait"`` or ``"keep"``; with
        ``recompute``, kept requests' caches are recomputed on resume), as ``InferenceEngine`` does."""
        await self._call("pause_generation", mode=mode, recompute=recompute)

    async def resume_generation(self) -> None:
        await self._call("resume_generation")

    # -- memory -------------------------------------------------------------------------------------
    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        await self._call("sleep", tags=_tags(tags), level=level, abort_first=abort_first,
                         drain_timeout=drain_timeout)

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        await self._call("wake_up", tags=_tags(tags))

    # -- weights ------------------------------------------------------------------------------------
    async def weight_specs(self) -> dict[str, TensorSpec]:
        self._check_open()
        if self._specs is None:
            self._specs = await self._dialect.weight_specs()
        return dict(self._specs)

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        await self._validate(_WEIGHTS, request)

    async def init_weight_update_communicator(
            self, init_info: WeightSyncInitInfo | Sequence[WeightSyncInitInfo]) -> None:
        await self._call("init_weight_update_communicator", init_info=init_info)

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        """Apply an update on the server's engine; returns its new weight version. In-process tensors
        (``strategy="tensors"``) travel through shared memory when the server is on this machine."""
        return int(await self._apply(_WEIGHTS, request))

    # -- how a request's tensors reach the server -----------------------------------------------------
    async def _validate(self, kind: _TensorCalls, request: WeightUpdateRequest, **arguments: Any) -> None:
        await self._call(kind.validate, request=await self._described(kind, request, arguments), **arguments)

    async def _apply(self, kind: _TensorCalls, request: WeightUpdateRequest, extra: dict[str, Any] | None = None,
                     **arguments: Any) -> Any:
        """Call ``kind.apply`` with ``request`` (and ``arguments``, ``extra``), its in-process tensors
        written into shared memory first."""
        described = await self._described(kind, request, arguments)
        if request.strategy != "tensors":
            return await self._call(kind.apply, request=request, **arguments, **(extra or {}))
        if self._tensor_lock is None:
            self._tensor_lock = asyncio.Lock()
        async with self._tensor_lock:  # one set of segments per engine: one tensor transfer at a time
            transferred = self._through_shared_memory(request, described)
            return await self._call(kind.apply, request=transferred, **arguments, **(extra or {}))

    async def _described(self, kind: _TensorCalls, request: WeightUpdateRequest,
                         arguments: dict[str, Any]) -> WeightUpdateRequest:
        """``request`` as the server sees it: a transported request as it is (``check_finite``
        included); in-process tensors checked here against their declaration (packing them would
        otherwise convert a tensor of another dtype) and described as the shared-memory update they
        travel as."""
        self._check_open()
        if request.strategy != "tensors":
            return request
        caps.require(self.capabilities, kind.tensors, self.backend, self._tensors_detail())
        described = dataclasses.replace(request, strategy="shared_memory", payload=None)
        try:
            check_delivered(request, payload_pairs(request))
        except WeightUpdateError:
            # An engine in process names the declaration's problems before the payload's: the
            # server's engine is asked about the declaration first, so the same error comes back.
            await self._call(kind.validate, request=described, **arguments)
            raise
        return described

    def _through_shared_memory(self, request: WeightUpdateRequest,
                               described: WeightUpdateRequest) -> WeightUpdateRequest:
        from skyrl_backends.weight_sync.chunks import plan
        from skyrl_backends.weight_sync.shared_memory import SharedMemorySender

        if self._tensor_sender is None:
            self._tensor_sender = SharedMemorySender()
        layout = plan(payload_pairs(request), dtype_for=dict(zip(request.names, request.dtypes, strict=True)))
        return dataclasses.replace(described, payload=self._tensor_sender.write(layout))

    def _tensors_detail(self) -> str:
        return (f"In-process tensors reach a remote engine through shared memory, which needs the trainer on the "
                f"server's machine; {self.url} is elsewhere. Use connect_broadcast(...) and strategy 'broadcast'.")

    async def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, Any]]) -> int:
        return await self.update_named_weights(WeightUpdateRequest.from_named_tensors(list(named_tensors)))

    # -- LoRA, cache, lifecycle ---------------------------------------------------------------------
    async def load_lora_adapter(self, lora_name: str, lora_path: str | os.PathLike[str],
                                pinned: bool = False) -> None:
        """Load an adapter from ``lora_path`` on the server's machine."""
        await self._call("load_lora_adapter", lora_name=lora_name, lora_path=os.fspath(lora_path), pinned=pinned)

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        """Raise if :meth:`load_lora_adapter_from_tensors` would refuse the adapter (checked by the
        server's engine, with the adapter's tensors described, not sent)."""
        await self._validate(_LORA, request, lora_name=lora_name, lora_config=dict(lora_config))

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        """Load or replace an adapter sent as tensors by ``request``'s strategy (in-process tensors
        through shared memory on the server's machine); returns the adapter's new version."""
        return int(await self._apply(_LORA, request, {"pinned": pinned}, lora_name=lora_name,
                                     lora_config=dict(lora_config)))

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self._call("unload_lora_adapter", lora_name=lora_name)

    async def reset_prefix_cache(self) -> None:
        await self._call("reset_prefix_cache")

    async def teardown(self) -> None:
        """Close the connection (safe to call more than once). The server keeps running unless this
        engine started it."""
        if self._closed:
            return
        self._closed = True
        if self._tensor_sender is not None:
            self._tensor_sender.close()
        try:
            await self._dialect.aclose()
        finally:
            if self._owned_server is not None:
                await asyncio.to_thread(self._owned_server.stop)

    async def __aenter__(self) -> RemoteEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.teardown()

    async def _call(self, method: str, **arguments: Any) -> Any:
        self._check_open()
        try:
            result, state = await self._dialect.call(method, arguments, uuid.uuid4().hex)
        except EngineDeadError:
            raise
        except SkyRLBackendsError:
            # The call may have changed the engine before failing (a sleep that aborted requests):
            # the mirror follows the server, not the hope.
            await self._refresh_quietly()
            raise
        self._mirror(state)
        return result

    async def _refresh_quietly(self) -> None:
        try:
            self._mirror(await self._dialect.state())
        except Exception:  # the error being raised says more than this one
            pass


def _tags(tags: Sequence[str] | None) -> list[str] | None:
    if tags is None:
        return None
    return [tags] if isinstance(tags, str) else list(tags)


__all__ = ["SAME_HOST_STRATEGIES", "RemoteEngine", "transport_capabilities"]
