"""The engine facade: one async API over any backend's engine hooks.

The facade owns the behaviour every backend must share, so plugins stay small and the semantics
cannot drift between engines:

* state: generating while asleep, or after a sleep that discarded the weights and before new weights
  arrived, is a defined error; a torn-down engine refuses everything;
* capabilities: a call or sampling parameter the backend declares unsupported is rejected before
  the backend sees it, naming the capability;
* validation: sampling parameters are canonical and validated; weight updates are checked name by
  name against the engine's parameters before anything is applied (atomic updates);
* bookkeeping: ``n > 1`` expansion with per-sample seeds, request ids, in-flight tracking so sleep
  can abort and drain, the weight version stamped on every completion, loaded LoRA adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from skyrl_backends import capabilities as caps
from skyrl_backends import lora
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import (
    EngineAsleepError,
    EngineClosedError,
    EngineStateError,
    LoraAdapterError,
    SamplingParamsError,
    WeightsNotLoadedError,
    WeightUpdateError,
    closest_match,
)
from skyrl_backends.registration import engine_manager
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import (
    MEMORY_TAGS,
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    StreamChunk,
    TensorSpec,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)
from skyrl_backends.weight_sync.manifest import check_broadcast_modes, is_streamed

logger = logging.getLogger(__name__)
# How long an abandoned stream's aborted requests get to return before their tasks are cancelled.
_STREAM_WIND_DOWN_S = 5.0


class InferenceEngine:
    """An engine of any backend, behind one async API. Create it with
    :func:`skyrl_backends.create_engine`."""

    def __init__(self, backend: str, engine_impl: object, config: GeneratorConfig,
                 capabilities: Capabilities, backend_hooks: Any, distribution: str | None = None) -> None:
        self.backend = backend
        self.config = config
        self.capabilities = capabilities
        self.distribution = distribution
        self.impl = engine_impl
        # Raises BackendLoadError naming the plugin and the hook (create_engine tears the engine down).
        self._manager = engine_manager(engine_impl, backend, capabilities, distribution)
        self._hooks = self._manager.hook
        self._backend_hooks = backend_hooks
        self.weight_version = 0
        self._asleep: set[str] = set()
        # Why the engine holds no complete set of weights (None: it does), and the parameters
        # received since, which must cover them all before generation is allowed again.
        self._weights_missing: str | None = None
        self._weights_received_since_missing: set[str] = set()
        self._closed = False
        self._paused = False
        self._inflight: dict[str, asyncio.Event] = {}
        self._loras: dict[str, str] = {}
        self._lora_versions: dict[str, int] = {}  # per adapter name, bumped by every load (never reset)
        self._lora_expected: dict[str, dict[str, TensorSpec]] = {}  # by config: what an adapter carries
        self._weight_specs: dict[str, TensorSpec] | None = None

    # -- introspection -----------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<InferenceEngine backend={self.backend!r} model={self.config.model!r} version={self.weight_version}>"

    @property
    def asleep_tags(self) -> frozenset[str]:
        return frozenset(self._asleep)

    @property
    def weights_loaded(self) -> bool:
        return self._weights_missing is None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def lora_adapters(self) -> dict[str, str]:
        return dict(self._loras)

    @property
    def lora_versions(self) -> dict[str, int]:
        """The version of each loaded adapter (stamped on its completions as ``lora_version``)."""
        return {name: self._lora_versions[name] for name in self._loras}

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def parallel_sizes(self) -> ParallelSizes:
        sizes = self._hooks.skyrl_backends_parallel_sizes()
        return sizes if sizes is not None else ParallelSizes()

    def tp_size(self) -> int:
        return self.parallel_sizes().tensor

    def pp_size(self) -> int:
        return self.parallel_sizes().pipeline

    def dp_size(self) -> int:
        return self.parallel_sizes().data

    def ep_size(self) -> int:
        return self.parallel_sizes().expert

    def engine_version(self) -> str | None:
        return self._hooks.skyrl_backends_engine_version()

    async def weight_specs(self) -> dict[str, TensorSpec]:
        """Every updatable parameter by name (cached: parameters do not change shape)."""
        return self._specs()

    def _specs(self) -> dict[str, TensorSpec]:
        if self._weight_specs is None:
            specs = self._hooks.skyrl_backends_weight_specs()
            self._weight_specs = {s.name: s for s in specs}
        return self._weight_specs

    def translate_sampling_params(self, params: SamplingParams | Mapping[str, Any]) -> Any:
        """The engine's own form of ``params``, after the capability checks: what the generate hooks
        receive as ``engine_params``."""
        params = params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params)
        caps.check_sampling(params, self.capabilities, self.backend)
        return self._backend_hooks.skyrl_backends_translate_sampling_params(params=params, config=self.config)

    # -- generation --------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest | Sequence[Sequence[int]],
                       sampling_params: SamplingParams | dict[str, Any] | None = None,
                       **request_fields: Any) -> GenerateOutput:
        """Generate for a batch of token-id prompts. Accepts a GenerateRequest, or prompts plus
        sampling parameters (and GenerateRequest's other fields as keywords)."""
        request, batches = self._admit(request, sampling_params, request_fields)
        params = request.sampling_params
        version = self.weight_version
        lora_version = self._lora_versions.get(request.lora_name) if request.lora_name is not None else None
        all_ids = [rid for b, _ in batches for rid in b.request_ids]
        events = {rid: asyncio.Event() for rid in all_ids}
        self._inflight.update(events)
        try:
            outputs = await asyncio.gather(*(self._call("skyrl_backends_generate", request=b, engine_params=e)
                                             for b, e in batches))
        finally:
            for rid in all_ids:
                self._inflight.pop(rid, None)
                events[rid].set()
        completions: list[Completion] = []
        for (batch, _), output in zip(batches, outputs):
            if not isinstance(output, GenerateOutput) or len(output) != len(batch):
                got = len(output) if isinstance(output, GenerateOutput) else type(output).__name__
                raise EngineStateError(
                    f"backend {self.backend!r} returned {got} completions for {len(batch)} prompts")
            for completion, rid in zip(output.completions, batch.request_ids):
                completion.request_id = completion.request_id or rid
                completion.weight_version = version
                completion.lora_version = lora_version
            completions.extend(output.completions)
        return GenerateOutput(_sample_major(completions, len(request), params.n))

    def _admit(self, request: GenerateRequest | Sequence[Sequence[int]],
               sampling_params: SamplingParams | Mapping[str, Any] | None,
               request_fields: dict[str, Any]) -> tuple[GenerateRequest, list[tuple[GenerateRequest, Any]]]:
        """The request as a GenerateRequest, after every check that precedes generation, and the
        engine calls it becomes (``n`` expanded), each with its parameters translated once."""
        request = GenerateRequest.coerce(request, sampling_params, request_fields)
        self._check_can_generate()
        if request.lora_name is not None:
            caps.require(self.capabilities, caps.LORA, self.backend)
            if request.lora_name not in self._loras:
                raise LoraAdapterError(
                    f"No LoRA adapter named {request.lora_name!r} is loaded. Loaded: "
                    f"{', '.join(sorted(self._loras)) or 'none'}. Load it with load_lora_adapter(name, path).")
        # Capability checks and the backend's own rejections, before any work starts.
        caps.check_sampling(request.sampling_params, self.capabilities, self.backend)
        batches = [(batch, self._backend_hooks.skyrl_backends_translate_sampling_params(
            params=batch.sampling_params, config=self.config)) for batch in _expand_samples(request)]
        return request, batches

    async def generate_stream(self, request: GenerateRequest | Sequence[Sequence[int]],
                              sampling_params: SamplingParams | dict[str, Any] | None = None,
                              **request_fields: Any) -> AsyncIterator[StreamChunk]:
        """Generate like :meth:`generate`, yielding :class:`StreamChunk` s as tokens are produced.

        Chunks of different completions interleave; ``chunk.index`` is the completion's position in
        :meth:`generate`'s output for the same request, and each index ends with one chunk carrying
        the final :class:`Completion` (weight version stamped). On a backend without the
        ``streaming`` capability each completion arrives as that one final chunk. Leaving the loop
        early aborts what still runs (when the backend can abort)."""
        request, batches = self._admit(request, sampling_params, request_fields)
        version = self.weight_version
        lora_version = self._lora_versions.get(request.lora_name) if request.lora_name is not None else None
        streams = _StreamMerger(len(request), request.sampling_params.n, [b for b, _ in batches])
        all_ids = [rid for b, _ in batches for rid in b.request_ids]
        events = {rid: asyncio.Event() for rid in all_ids}
        self._inflight.update(events)
        queue: asyncio.Queue[tuple[int, StreamChunk | Exception | None]] = asyncio.Queue()

        async def pump(number: int, batch: GenerateRequest, engine_params: Any) -> None:
            try:
                async for chunk in self._batch_stream(batch, engine_params):
                    queue.put_nowait((number, chunk))
                queue.put_nowait((number, None))
            except Exception as error:  # handed to the consumer, which re-raises it
                queue.put_nowait((number, error))
            finally:
                for rid in batch.request_ids:
                    self._inflight.pop(rid, None)
                    events[rid].set()

        tasks = [asyncio.ensure_future(pump(number, batch, engine_params))
                 for number, (batch, engine_params) in enumerate(batches)]
        running = len(tasks)
        try:
            while running:
                number, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                chunk = streams.place(number, item, self.backend)
                if chunk.completion is not None:
                    chunk.completion.weight_version = version
                    chunk.completion.lora_version = lora_version
                yield chunk
            streams.check_complete(self.backend)
        finally:
            await self._end_streams(tasks, [rid for rid in all_ids if rid in self._inflight])

    async def _batch_stream(self, batch: GenerateRequest, engine_params: Any) -> AsyncIterator[StreamChunk]:
        """One expanded batch's chunks, from the backend's stream or, without one, its final output."""
        if self.capabilities.streaming:
            async for chunk in self._hooks.skyrl_backends_generate_stream(request=batch, engine_params=engine_params):
                yield chunk
            return
        output = await self._call("skyrl_backends_generate", request=batch, engine_params=engine_params)
        if not isinstance(output, GenerateOutput) or len(output) != len(batch):
            got = len(output) if isinstance(output, GenerateOutput) else type(output).__name__
            raise EngineStateError(f"backend {self.backend!r} returned {got} completions for {len(batch)} prompts")
        for index, completion in enumerate(output.completions):
            yield StreamChunk.final(index, completion)

    async def _end_streams(self, tasks: list[asyncio.Future], unfinished: list[str]) -> None:
        """After the consumer stopped reading: abort what still runs and let it wind down."""
        if all(t.done() for t in tasks):
            return
        if unfinished and self.capabilities.abort and not self._closed:
            with contextlib.suppress(Exception):
                await self._call("skyrl_backends_abort", request_ids=unfinished)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), _STREAM_WIND_DOWN_S)
        for task in tasks:
            task.cancel()

    def _check_can_generate(self) -> None:
        if self._closed:
            raise EngineClosedError()
        if self._asleep:
            raise EngineAsleepError(self._asleep)
        if self._weights_missing is not None:
            raise WeightsNotLoadedError(self._weights_missing)

    # -- abort / pause -----------------------------------------------------------------------
    async def abort(self, request_ids: Sequence[str] | None = None) -> None:
        """Abort in-flight requests (all when None); their callers get partial output with finish
        reason ``"abort"``."""
        caps.require(self.capabilities, caps.ABORT, self.backend)
        ids = list(request_ids) if request_ids is not None else None
        await self._call("skyrl_backends_abort", request_ids=ids)

    async def pause_generation(self) -> None:
        """Hold in-flight requests between steps until :meth:`resume_generation` (native pause)."""
        caps.require(self.capabilities, caps.NATIVE_PAUSE, self.backend,
                     "The engine client pauses such engines by aborting and resubmitting instead.")
        await self._call("skyrl_backends_pause_generation")
        self._paused = True

    async def resume_generation(self) -> None:
        caps.require(self.capabilities, caps.NATIVE_PAUSE, self.backend)
        await self._call("skyrl_backends_resume_generation")
        self._paused = False

    async def _drain(self, timeout: float) -> None:
        events = list(self._inflight.values())
        if events:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)

    # -- memory ------------------------------------------------------------------------------
    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        """Release memory: ``tags`` among ``"weights"`` and ``"kv_cache"`` (None: both).

        In-flight requests are aborted (their callers get partial output) and drained first, and the
        prefix cache is reset, so no stale cache survives a wake (vLLM issue #17103)."""
        self._check_open()
        declared = self.capabilities
        caps.require(declared, caps.sleep_level(level), self.backend,
                     f"Declared levels: {list(declared.sleep_levels)}.")
        tag_list = _check_tags(tags)
        if tags is not None and set(tag_list) != set(MEMORY_TAGS):
            caps.require(declared, caps.SLEEP_TAGS, self.backend, "Call sleep() without tags.")
        # Memory already released stays released: engines differ on a second release of the same
        # memory (vLLM logs and ignores it, SGLang's memory saver aborts its scheduler), so only
        # what is awake is put to sleep, and sleeping a sleeping engine is a no-op.
        tag_list = [t for t in tag_list if t not in self._asleep]
        if not tag_list:
            return
        if self._inflight:
            if abort_first and caps.ABORT(declared):
                await self._call("skyrl_backends_abort", request_ids=None)
            try:
                await self._drain(drain_timeout)
            except asyncio.TimeoutError:
                raise EngineStateError(
                    f"{len(self._inflight)} request(s) still running after {drain_timeout}s; "
                    "sleep refused. Abort them or raise drain_timeout.") from None
        if caps.PREFIX_CACHING(declared):
            await self._call("skyrl_backends_reset_prefix_cache")
        await self._call("skyrl_backends_sleep", tags=tag_list, level=level)
        self._asleep.update(tag_list)
        if ("weights" in tag_list and declared.discards_weights_at_level is not None
                and level >= declared.discards_weights_at_level):
            self._mark_weights_missing("The engine discarded its weights when it went to sleep and has not "
                                       "been given new ones.")

    async def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take back memory released by :meth:`sleep` (None: everything asleep)."""
        self._check_open()
        caps.require(self.capabilities, caps.SLEEP, self.backend)
        tag_list = _check_tags(tags) if tags is not None else sorted(self._asleep)
        tag_list = [t for t in tag_list if t in self._asleep]
        if not tag_list:
            return
        await self._call("skyrl_backends_wake_up", tags=tag_list)
        self._asleep.difference_update(tag_list)

    # -- weights -----------------------------------------------------------------------------
    async def init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        self._check_open()
        caps.require(self.capabilities, caps.weight_sync(init_info.strategy), self.backend,
                     f"Supported: {list(self.capabilities.weight_sync_strategies)}.")
        await self._call("skyrl_backends_init_weight_update_communicator", init_info=init_info)

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        """Raise WeightUpdateError naming every tensor whose name, shape or dtype does not match."""
        self._validate_weight_update(request)

    def _validate_weight_update(self, request: WeightUpdateRequest) -> None:
        specs = self._specs()
        problems: dict[str, str] = {}
        for name, shape, dtype in zip(request.names, request.shapes, request.dtypes):
            spec = specs.get(name)
            if spec is None:
                hint = closest_match(name, specs)
                problems[name] = "no such parameter" + (f" (did you mean {hint!r}?)" if hint else "")
            elif tuple(shape) != tuple(spec.shape):
                problems[name] = f"shape {tuple(shape)} does not match the engine's {tuple(spec.shape)}"
            elif dtype != spec.dtype:
                problems[name] = f"dtype {dtype} does not match the engine's {spec.dtype}; convert before sending"
        if problems:
            raise WeightUpdateError(problems)
        caps.require(self.capabilities, caps.weight_sync(request.strategy), self.backend,
                     f"Supported: {list(self.capabilities.weight_sync_strategies)}.")
        if request.strategy == "broadcast":
            self._check_broadcast_layout(request)

    def _check_broadcast_layout(self, request: WeightUpdateRequest) -> None:
        # Checked before the trainer broadcasts a byte: a receiver expecting another layout would
        # otherwise wait for collectives that never match until the group times out.
        # (A streamed update is packed, so an engine without "packed" refuses it here too.)
        payload = request.payload if isinstance(request.payload, Mapping) else {}
        layout = payload.get("layout", "packed")
        check_broadcast_modes(layout, payload.get("apply", "atomic"), "payload.")
        supported = caps.broadcast_layouts_of(self.capabilities)
        if layout not in supported:
            raise WeightUpdateError({"payload.layout": f"got {layout!r}; {self.backend} receives broadcasts as "
                                                       f"{list(supported)}: create the sender with that layout "
                                                       f"(connect_broadcast picks it when left out)"})

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        """Apply a weight update atomically; returns the new weight version.

        Everything is validated first, so a bad update changes nothing. The one exception is a
        broadcast the trainer sent ``apply="streamed"``, which the engine applies bucket by bucket:
        if its transfer fails partway, generation is refused until every parameter has been received
        again, as after a sleep that discarded the weights."""
        self._check_open()
        if "weights" in self._asleep:
            raise EngineAsleepError(["weights"])
        self._validate_weight_update(request)
        try:
            await self._call("skyrl_backends_update_named_weights", request=request)
        except Exception as exc:
            if is_streamed(request):  # some buckets may be applied: never serve the mix
                self._mark_weights_missing(
                    f"A streamed weight update failed partway ({type(exc).__name__}: {exc}), so the engine "
                    f"may hold a mix of old and new weights. If its broadcast group broke, reconnect it "
                    f"(connect_broadcast).")
            raise
        self.weight_version += 1
        if self._weights_missing is not None:
            self._weights_received_since_missing.update(request.names)
            if self._weights_received_since_missing >= set(self._specs()):
                self._weights_missing = None
        return self.weight_version

    def _mark_weights_missing(self, reason: str) -> None:
        self._weights_missing = reason
        self._weights_received_since_missing.clear()

    async def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, Any]]) -> int:
        """Convenience for a trainer in the same process: ``[(name, tensor), ...]``."""
        return await self.update_named_weights(WeightUpdateRequest.from_named_tensors(list(named_tensors)))

    # -- LoRA --------------------------------------------------------------------------------
    async def load_lora_adapter(self, lora_name: str, lora_path: str | os.PathLike[str], pinned: bool = False) -> None:
        self._check_open()
        caps.require(self.capabilities, caps.LORA, self.backend)
        if not self.config.enable_lora:
            raise EngineStateError("LoRA is off for this engine; create it with enable_lora=True.")
        self._check_weights_awake()
        path = os.fspath(lora_path)
        if not os.path.isdir(path):
            raise LoraAdapterError(f"lora_path {path!r} is not a directory holding a PEFT adapter.")
        if lora_name in self._loras:
            raise LoraAdapterError(f"A LoRA adapter named {lora_name!r} is already loaded; unload it first.")
        await self._call("skyrl_backends_load_lora_adapter", lora_name=lora_name, lora_path=path, pinned=pinned)
        self._loras[lora_name] = path
        self._lora_versions[lora_name] = self._lora_versions.get(lora_name, 0) + 1

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        """Raise if :meth:`load_lora_adapter_from_tensors` would refuse the adapter: the capability
        and strategy, the config, and every tensor's name, shape and dtype (WeightUpdateError)."""
        self._validate_lora_from_tensors(lora_name, lora_config, request)

    def _validate_lora_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                    request: WeightUpdateRequest) -> None:
        self._check_open()
        caps.require(self.capabilities, caps.LORA_FROM_TENSORS, self.backend)
        caps.require(self.capabilities, caps.lora_from_tensors_by(request.strategy), self.backend,
                     f"Supported: {list(self.capabilities.lora_from_tensors)}.")
        if not self.config.enable_lora:
            raise EngineStateError("LoRA is off for this engine; create it with enable_lora=True.")
        if not isinstance(lora_name, str) or not lora_name:
            raise LoraAdapterError(f"lora_name must be a non-empty string, got {lora_name!r}.")
        lora.check_adapter_tensors(request, self._lora_tensors_of(lora_config))
        if request.strategy == "broadcast":
            self._check_broadcast_layout(request)

    def _lora_tensors_of(self, lora_config: Mapping[str, Any]) -> dict[str, TensorSpec]:
        """The tensors an adapter of ``lora_config`` must carry here (kept per config: a trainer sends
        the same adapter shape every step, and working it out walks every parameter)."""
        try:
            key = json.dumps(lora_config, sort_keys=True)
        except (TypeError, ValueError):
            key = None  # check_config names the problem
        expected = self._lora_expected.get(key) if key is not None else None
        if expected is None:
            expected = lora.expected_tensors(lora_config, self._specs(), self.config.max_lora_rank)
            if key is not None:
                if len(self._lora_expected) >= 8:
                    self._lora_expected.clear()
                self._lora_expected[key] = expected
        return expected

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        """Load the LoRA adapter whose tensors ``request`` carries (any weight-sync strategy the backend
        declares in ``lora_from_tensors``) under ``lora_name``, replacing an adapter of that name.
        ``lora_config`` is a PEFT ``LoraConfig`` as JSON (:mod:`skyrl_backends.lora`). Everything is
        validated first: a refused adapter changes nothing, and the previous adapter keeps serving.
        Returns the adapter's new version, stamped on its completions as ``lora_version``."""
        self._validate_lora_from_tensors(lora_name, lora_config, request)
        self._check_weights_awake()
        await self._call("skyrl_backends_load_lora_adapter_from_tensors", lora_name=lora_name,
                         lora_config=dict(lora_config), request=request, pinned=pinned)
        self._loras[lora_name] = lora.FROM_TENSORS
        self._lora_versions[lora_name] = self._lora_versions.get(lora_name, 0) + 1
        return self._lora_versions[lora_name]

    async def unload_lora_adapter(self, lora_name: str) -> None:
        self._check_open()
        caps.require(self.capabilities, caps.LORA, self.backend)
        if lora_name not in self._loras:
            raise LoraAdapterError(
                f"No LoRA adapter named {lora_name!r} is loaded. Loaded: {', '.join(sorted(self._loras)) or 'none'}.")
        self._check_weights_awake()
        await self._call("skyrl_backends_unload_lora_adapter", lora_name=lora_name)
        del self._loras[lora_name]

    # -- cache and lifecycle -----------------------------------------------------------------
    async def reset_prefix_cache(self) -> None:
        self._check_open()
        caps.require(self.capabilities, caps.PREFIX_CACHING, self.backend)
        await self._call("skyrl_backends_reset_prefix_cache")

    async def teardown(self) -> None:
        """Stop the engine. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await self._call("skyrl_backends_teardown")

    async def __aenter__(self) -> InferenceEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.teardown()

    def _check_weights_awake(self) -> None:
        # Adapters are applied to the weights; engines cannot attach them to released memory.
        if "weights" in self._asleep:
            raise EngineAsleepError(["weights"])

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError()

    async def _call(self, hook_name: str, **kwargs: Any) -> Any:
        hook = getattr(self._hooks, hook_name)
        started = time.perf_counter()
        result = hook(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        logger.debug("%s.%s took %.3fs", self.backend, hook_name, time.perf_counter() - started)
        return result


class _StreamMerger:
    """Maps chunks of the expanded batches to the indices of :meth:`InferenceEngine.generate`'s output,
    stamps request ids on completions, and checks each completion against its chunks."""

    def __init__(self, num_prompts: int, n: int, batches: list[GenerateRequest]) -> None:
        self.num_prompts, self.n = num_prompts, n
        self.batches = batches
        self.offsets = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]
        self.sent: dict[int, list[int]] = {}
        self.finished: set[int] = set()

    def place(self, number: int, chunk: StreamChunk, backend: str) -> StreamChunk:
        batch = self.batches[number]
        if not isinstance(chunk, StreamChunk) or not 0 <= chunk.index < len(batch):
            raise EngineStateError(f"backend {backend!r} streamed {chunk!r} for a batch of {len(batch)} prompts")
        # Expanded batches are sample-major (sample j of prompt i at j * num_prompts + i).
        sample, prompt = divmod(self.offsets[number] + chunk.index, self.num_prompts)
        index = prompt * self.n + sample
        if index in self.finished:
            raise EngineStateError(f"backend {backend!r} streamed tokens after the final chunk of prompt {index}")
        tokens = self.sent.setdefault(index, [])
        tokens.extend(chunk.token_ids)
        if chunk.completion is not None:
            self.finished.add(index)
            if list(chunk.completion.token_ids) != tokens:
                raise EngineStateError(
                    f"backend {backend!r}: the streamed tokens of prompt {index} ({len(tokens)}) are not its "
                    f"completion's ({len(chunk.completion.token_ids)})")
            chunk.completion.request_id = chunk.completion.request_id or batch.request_ids[chunk.index]
        chunk.index = index
        return chunk

    def check_complete(self, backend: str) -> None:
        missing = self.num_prompts * self.n - len(self.finished)
        if missing:
            raise EngineStateError(f"backend {backend!r} ended its stream without {missing} final completion(s)")


def _check_tags(tags: Sequence[str] | None) -> list[str]:
    if tags is None:
        return list(MEMORY_TAGS)
    if isinstance(tags, str):
        tags = [tags]
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown or not tags:
        raise SamplingParamsError.out_of_range("tags", list(tags), f"a non-empty subset of {list(MEMORY_TAGS)}")
    return list(dict.fromkeys(tags))


def _expand_samples(request: GenerateRequest) -> list[GenerateRequest]:
    """Turn ``n`` samples per prompt into batches with ``n=1``, ordered so that concatenating their
    outputs and calling :func:`_sample_major` gives prompt-major order.

    Unseeded: one batch with every prompt repeated ``n`` times. Seeded: one batch per sample ``j``
    with ``seed + j``, since a batch carries one SamplingParams and every backend must then draw the
    same independent streams."""
    params = request.sampling_params
    if params.n == 1:
        return [request]
    n = params.n
    batches = []
    for j in range(n):
        batches.append(GenerateRequest(
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=params.replace(n=1, seed=None if params.seed is None else params.seed + j),
            request_ids=[f"{rid}-{j}" for rid in request.request_ids],
            session_ids=request.session_ids, lora_name=request.lora_name))
    if params.seed is None:
        merged = GenerateRequest(
            prompt_token_ids=[p for b in batches for p in b.prompt_token_ids],
            sampling_params=batches[0].sampling_params,
            request_ids=[r for b in batches for r in b.request_ids],
            session_ids=[s for b in batches for s in b.session_ids] if request.session_ids else None,
            lora_name=request.lora_name)
        return [merged]
    return batches


def _sample_major(completions: list[Completion], num_prompts: int, n: int) -> list[Completion]:
    """Reorder sample-major completions (all prompts for sample 0, then sample 1...) prompt-major."""
    if n == 1:
        return completions
    return [completions[j * num_prompts + i] for i in range(num_prompts) for j in range(n)]
