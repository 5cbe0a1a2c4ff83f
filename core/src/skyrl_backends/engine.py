"""The engine facade: one async API over any backend's engine hooks.

The facade owns the behaviour every backend must share, so plugins stay small and the semantics
cannot drift between engines:

* state: generating while asleep, or after a sleep that discarded the weights and before new weights
  arrived, is a defined error; a torn-down engine refuses everything;
* capabilities: a call or sampling parameter the backend declares unsupported is rejected before
  the backend sees it, naming the capability;
* validation: sampling parameters are canonical and validated; weight updates are checked name by
  name against the engine's parameters, and in-process tensors against that declaration
  (:mod:`skyrl_backends.weight_sync.delivery`), before anything is applied (atomic updates);
* bookkeeping: ``n > 1`` expansion with per-sample seeds, request ids, in-flight tracking so sleep
  can abort and drain, loaded LoRA adapters;
* pausing and weight versions: the three pause modes on every backend (natively where the backend
  does them, emulated otherwise; new requests wait at an admission gate until resume), and the
  weight version of every token (the backend's labels, checked, or for a backend that does not
  label, the admission version, kept exact by applying no update under its requests).
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
from skyrl_backends.pausing import AdmissionGate
from skyrl_backends.registration import engine_manager
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import (
    MEMORY_TAGS,
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    PauseMode,
    StreamChunk,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
    check_pause_mode,
)
from skyrl_backends.version_labels import labelled
from skyrl_backends.weight_sync.delivery import check_delivered, check_finite, payload_pairs
from skyrl_backends.weight_sync.manifest import check_broadcast_modes, is_streamed

logger = logging.getLogger(__name__)
# How long an abandoned stream's aborted requests get to return before their tasks are cancelled.
_STREAM_WIND_DOWN_S = 5.0
# How long teardown waits for requests in flight to return their partial output before stopping.
_TEARDOWN_DRAIN_S = 5.0
# How long requests ended by a pause in mode "abort" get to return.
_ABORT_DRAIN_S = 30.0
_PAUSE_HINTS = {
    "keep": "Pause in mode 'abort' or 'wait', or through InferenceEngineClient, which keeps requests of such "
            "engines by aborting and continuing them.",
    "abort": "Pause in mode 'wait' (in-flight requests finish) instead.",
    "wait": "",
}


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
        self._pause: tuple[str, bool] | None = None  # (mode, recompute) while paused
        self._gate = AdmissionGate()
        self._updates = 0  # names the gate holds of updates waiting for in-flight requests
        self._told_update_waits = False  # the once-per-engine warning that updates wait for requests
        self._applying: int | None = None  # the version an update being applied becomes
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
        return self._pause is not None

    @property
    def pause_mode(self) -> str | None:
        """The mode of the current pause (None: not paused)."""
        return self._pause[0] if self._pause is not None else None

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
        lora_version = self._lora_versions.get(request.lora_name) if request.lora_name is not None else None
        all_ids = [rid for b, _ in batches for rid in b.request_ids]
        aborted = await self._enter(all_ids)
        # Nothing awaits from here to the registration below: an update barrier or a pause that
        # closes the gate now sees these requests in flight.
        version = self.weight_version
        events = {rid: asyncio.Event() for rid in all_ids}
        self._inflight.update(events)
        try:
            outputs = await asyncio.gather(*(self._generate_batch(b, e, aborted) for b, e in batches))
        finally:
            for rid in all_ids:
                self._inflight.pop(rid, None)
                events[rid].set()
        completions: list[Completion] = []
        for (batch, _), output in zip(batches, outputs):
            for completion, rid in zip(output, batch.request_ids):
                completion.request_id = completion.request_id or rid
                completion.token_versions = self._versions(completion.token_versions, len(completion.token_ids),
                                                           version, f"the completion of {rid}")
                completion.lora_version = lora_version
                if not params.detokenize:  # the contract, whether or not the backend skipped decoding
                    completion.text = None
            completions.extend(output)
        return GenerateOutput(_sample_major(completions, len(request), params.n))

    async def _generate_batch(self, batch: GenerateRequest, engine_params: Any, aborted: set[str]) -> list[Completion]:
        """One expanded batch through the generate hook; prompts aborted while waiting at the gate
        get an empty aborted completion instead."""
        admitted = [i for i, rid in enumerate(batch.request_ids) if rid not in aborted]
        completions: list[Completion | None] = [None] * len(batch)
        if admitted:
            sub = batch if len(admitted) == len(batch) else batch.subset(admitted)
            output = await self._call("skyrl_backends_generate", request=sub, engine_params=engine_params)
            if not isinstance(output, GenerateOutput) or len(output) != len(sub):
                got = len(output) if isinstance(output, GenerateOutput) else type(output).__name__
                raise EngineStateError(f"backend {self.backend!r} returned {got} completions for {len(sub)} prompts")
            for i, completion in zip(admitted, output.completions):
                completions[i] = completion
        return [c if c is not None else _aborted_unstarted(rid) for c, rid in zip(completions, batch.request_ids)]

    async def _enter(self, request_ids: list[str]) -> set[str]:
        """Pass the admission gate (waiting while paused); returns the ids aborted while waiting."""
        aborted = await self._gate.enter(request_ids)
        self._check_can_generate()  # the engine may have gone to sleep or closed meanwhile
        return aborted

    def _versions(self, given: TokenVersions | None, num_tokens: int, admitted: int, what: str) -> TokenVersions:
        # While an update is applied, a backend may already produce tokens of its version (the hook
        # has not returned yet, so weight_version is not bumped).
        newest = max(self.weight_version, self._applying or 0)
        return labelled(given, num_tokens, admitted, newest, self.capabilities.token_versions, self.backend, what)

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
        all_ids = [rid for b, _ in batches for rid in b.request_ids]
        aborted = await self._enter(all_ids)
        version = self.weight_version
        lora_version = self._lora_versions.get(request.lora_name) if request.lora_name is not None else None
        streams = _StreamMerger(len(request), request.sampling_params.n, [b for b, _ in batches])
        events = {rid: asyncio.Event() for rid in all_ids}
        self._inflight.update(events)
        queue: asyncio.Queue[tuple[int, StreamChunk | Exception | None]] = asyncio.Queue()

        async def pump(number: int, batch: GenerateRequest, engine_params: Any) -> None:
            try:
                async for chunk in self._batch_stream(batch, engine_params, aborted):
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
                chunk = streams.place(number, item, self.backend,
                                      lambda given, count, what: self._versions(given, count, version, what))
                if chunk.completion is not None:
                    chunk.completion.lora_version = lora_version
                    if not request.sampling_params.detokenize:
                        chunk.completion.text = None
                yield chunk
            streams.check_complete(self.backend)
        finally:
            await self._end_streams(tasks, [rid for rid in all_ids if rid in self._inflight])

    async def _batch_stream(self, batch: GenerateRequest, engine_params: Any,
                            aborted: set[str]) -> AsyncIterator[StreamChunk]:
        """One expanded batch's chunks, from the backend's stream or, without one, its final output;
        prompts aborted while waiting at the gate end at once with nothing generated."""
        admitted = [i for i, rid in enumerate(batch.request_ids) if rid not in aborted]
        for index, rid in enumerate(batch.request_ids):
            if rid in aborted:
                yield StreamChunk.final(index, _aborted_unstarted(rid))
        if not admitted:
            return
        sub = batch if len(admitted) == len(batch) else batch.subset(admitted)
        if self.capabilities.streaming:
            async for chunk in self._hooks.skyrl_backends_generate_stream(request=sub, engine_params=engine_params):
                if isinstance(chunk, StreamChunk) and 0 <= chunk.index < len(sub):
                    chunk.index = admitted[chunk.index]
                yield chunk
            return
        for index, completion in zip(admitted, await self._generate_batch(sub, engine_params, set())):
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
        self._gate.abort(ids)
        await self._call("skyrl_backends_abort", request_ids=ids)

    async def pause_generation(self, mode: PauseMode = "keep", *, recompute: bool = False) -> None:
        """Pause generation until :meth:`resume_generation`; in every mode new requests wait.

        * ``"keep"`` (native pause): in-flight requests stay in the engine with their caches and
          continue on resume; with ``recompute=True`` (capability ``recompute_on_resume``) their
          caches are recomputed with the weights current at resume.
        * ``"abort"``: in-flight requests end now with their partial output, finish reason
          ``"abort"``; returns once their callers have them.
        * ``"wait"``: in-flight requests run to their end; returns once they have.

        docs/weight-sync.md ("Pause modes") says what each mode means for the log-probabilities of
        the tokens after a weight update. Pausing again in the same mode does nothing."""
        check_pause_mode(mode, recompute)
        self._check_open()
        caps.require(self.capabilities, caps.pause_mode(mode, recompute), self.backend, _PAUSE_HINTS[mode])
        if self._pause is not None:
            if self._pause == (mode, recompute):
                return
            raise EngineStateError(f"the engine is already paused in mode {self._pause[0]!r}; "
                                   "call resume_generation() before pausing in another mode.")
        self._pause = (mode, recompute)
        self._gate.close("pause")
        try:
            if self.capabilities.pauses_natively(mode):
                await self._call("skyrl_backends_pause_generation", mode=mode, recompute=recompute)
            elif mode == "abort" and self._inflight:
                await self._call("skyrl_backends_abort", request_ids=None)
            if mode == "abort":
                try:
                    await self._drain(_ABORT_DRAIN_S)
                except TimeoutError:
                    raise EngineStateError(f"{len(self._inflight)} aborted request(s) did not return within "
                                           f"{_ABORT_DRAIN_S}s") from None
            elif mode == "wait":
                await self._drain(None)
        except BaseException:
            self._pause = None
            self._gate.open("pause")
            raise

    async def resume_generation(self) -> None:
        """End the pause: kept requests continue, waiting requests are admitted. Resuming an
        engine that is not paused does nothing."""
        self._check_open()
        if self._pause is None:
            return
        if self.capabilities.pauses_natively(self._pause[0]):
            await self._call("skyrl_backends_resume_generation")
        self._pause = None
        self._gate.open("pause")

    async def _drain(self, timeout: float | None) -> None:
        events = list(self._inflight.values())
        if events:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)

    # -- memory ------------------------------------------------------------------------------
    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None:
        """Release memory: ``tags`` among ``"weights"`` and ``"kv_cache"`` (None: both).

        In-flight requests are aborted (their callers get partial output) and drained first, and the
        prefix cache is reset (by the facade, unless the backend's sleep does it itself:
        ``Capabilities.sleep_clears_prefix_cache``), so no stale cache survives a wake (vLLM issue
        #17103)."""
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
            except TimeoutError:
                raise EngineStateError(
                    f"{len(self._inflight)} request(s) still running after {drain_timeout}s; "
                    "sleep refused. Abort them or raise drain_timeout.") from None
        if caps.PREFIX_CACHING(declared) and not declared.sleep_clears_prefix_cache:
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
        """Raise WeightUpdateError naming every tensor whose name, shape or dtype does not match (for
        in-process tensors, also every tensor missing or unlike its declaration). Values
        (``check_finite``) are checked when the update is applied, where the engine holds them."""
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
        elif request.strategy == "tensors":  # the tensors are here: what is delivered is what was declared
            check_delivered(request, payload_pairs(request))

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
        if request.check_finite and not caps.receives_packed_broadcast(self.capabilities):
            # Such an engine receives broadcasts with its own code, loading each tensor as it arrives.
            raise WeightUpdateError({"check_finite": f"{self.backend} loads broadcast tensors as they arrive, so it "
                                                     f"cannot check their values first; check them in the trainer "
                                                     f"or send them with another strategy"})

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        """Apply a weight update atomically; returns the new weight version.

        Everything is validated first (declared names, shapes and dtypes against the engine's; the
        tensors delivered against that declaration; their values with ``request.check_finite``), so a
        bad update changes nothing. The one exception is a broadcast the trainer sent
        ``apply="streamed"``, which the engine applies bucket by bucket: if its transfer fails
        partway, generation is refused until every parameter has been received again, as after a
        sleep that discarded the weights."""
        self._check_open()
        if "weights" in self._asleep:
            raise EngineAsleepError(["weights"])
        self._validate_weight_update(request)
        if request.check_finite and request.strategy == "tensors":  # transported values: their receiver checks
            await asyncio.to_thread(check_finite, payload_pairs(request))
        if self.capabilities.token_versions or not self._inflight:
            return await self._apply_update(request)
        # The backend cannot say which tokens the new weights produced: no request may span the update.
        if self._pause is not None and self._pause[0] == "keep":
            raise EngineStateError(
                f"backend {self.backend!r} does not label tokens with weight versions (capability "
                f"'token_versions'), so an update cannot land under the {len(self._inflight)} request(s) this "
                f"'keep' pause holds. Pause in mode 'abort' or 'wait' before updating, or go through "
                f"InferenceEngineClient, which keeps requests of such engines by aborting and continuing them.")
        self._updates += 1
        holder = f"update-{self._updates}"
        self._gate.close(holder)
        try:
            self._tell_update_waits(len(self._inflight))
            started = time.monotonic()
            await self._drain(None)
            logger.info("weight update %d waited %.2f s for the requests in flight to end", self._updates,
                        time.monotonic() - started)
            return await self._apply_update(request)
        finally:
            self._gate.open(holder)

    def _tell_update_waits(self, in_flight: int) -> None:
        """Say once per engine why an update stands still: a rollout of thousands of tokens holds
        every update for as long, which looks like a hang to a trainer that did not expect it."""
        if self._told_update_waits:
            return
        self._told_update_waits = True
        logger.warning(
            "backend %r labels no token with its weight version (capability 'token_versions'), so this weight "
            "update waits for the %d request(s) in flight to end, as will every update that finds requests running. "
            "To keep requests running across updates, update through InferenceEngineClient (it aborts and "
            "continues them), or pause_generation('abort') before updating.", self.backend, in_flight)

    async def _apply_update(self, request: WeightUpdateRequest) -> int:
        self._applying = self.weight_version + 1
        try:
            await self._call("skyrl_backends_update_named_weights", request=request, version=self._applying)
        except Exception as exc:
            if is_streamed(request):  # some buckets may be applied: never serve the mix
                self._mark_weights_missing(
                    f"A streamed weight update failed partway ({type(exc).__name__}: {exc}), so the engine "
                    f"may hold a mix of old and new weights. If its broadcast group broke, reconnect it "
                    f"(connect_broadcast).")
            raise
        finally:
            self._applying = None
        self.weight_version += 1
        if self._weights_missing is not None:
            specs = self._specs()
            received = self._weights_received_since_missing
            received.update(request.names)
            # A tied name stands for its parameter: either name sent is the parameter sent.
            received.update(specs[name].tied_to for name in request.names
                            if name in specs and specs[name].tied_to is not None)
            if received >= {name for name, spec in specs.items() if spec.tied_to is None}:
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
        """Stop the engine. Safe to call more than once.

        New calls are refused at once; requests in flight are aborted first (when the backend can
        abort) and given a few seconds to return, so their callers get the partial output with
        finish reason ``"abort"`` (the engine client continues it on another engine) instead of an
        error from an engine stopping under them."""
        if self._closed:
            return
        self._closed = True
        self._gate.release_all()  # waiting requests find the engine closed
        if self._inflight:
            if caps.ABORT(self.capabilities):
                with contextlib.suppress(Exception):  # stopping goes ahead whatever the abort does
                    await self._call("skyrl_backends_abort", request_ids=None)
            with contextlib.suppress(asyncio.TimeoutError):
                await self._drain(_TEARDOWN_DRAIN_S)
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
        self.versions: dict[int, TokenVersions] = {}
        self.finished: set[int] = set()

    def place(self, number: int, chunk: StreamChunk, backend: str,
              label: Any) -> StreamChunk:
        """``chunk`` with its index in ``generate``'s order and its (and its completion's) token
        versions checked by ``label(given, num_tokens, what)``."""
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
        rid = batch.request_ids[chunk.index]
        chunk.token_versions = label(chunk.token_versions, len(chunk.token_ids), f"a stream chunk of {rid}")
        versions = self.versions[index] = self.versions.get(index, TokenVersions((), 0)).concat(chunk.token_versions)
        if chunk.completion is not None:
            self.finished.add(index)
            completion = chunk.completion
            if list(completion.token_ids) != tokens:
                raise EngineStateError(
                    f"backend {backend!r}: the streamed tokens of prompt {index} ({len(tokens)}) are not its "
                    f"completion's ({len(completion.token_ids)})")
            completion.token_versions = label(completion.token_versions, len(completion.token_ids),
                                              f"the completion of {rid}")
            if versions.length and completion.token_versions.runs != versions.runs:
                raise EngineStateError(
                    f"backend {backend!r}: the streamed token versions of prompt {index} {versions.to_json()} are not "
                    f"its completion's {completion.token_versions.to_json()}")
            completion.request_id = completion.request_id or rid
        chunk.index = index
        return chunk

    def check_complete(self, backend: str) -> None:
        missing = self.num_prompts * self.n - len(self.finished)
        if missing:
            raise EngineStateError(f"backend {backend!r} ended its stream without {missing} final completion(s)")


def _aborted_unstarted(request_id: str) -> Completion:
    """A request aborted before the engine saw it (while it waited at the admission gate)."""
    return Completion(token_ids=[], finish_reason="abort", request_id=request_id, text="")


def _check_tags(tags: Sequence[str] | None) -> list[str]:
    if tags is None:
        return list(MEMORY_TAGS)
    if isinstance(tags, str):
        tags = [tags]
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown or not tags:
        raise SamplingParamsError.out_of_range("tags", list(tags), f"a non-empty subset of {list(MEMORY_TAGS)}")
    return list(dict.fromkeys(tags))


def sample_request_ids(request: GenerateRequest) -> list[str]:
    """The id the engine tracks (and aborts) each completion of ``request`` by, in ``generate``'s
    output order (prompt-major): the request id when ``n`` is 1, ``<id>-<j>`` for sample ``j``."""
    n = request.sampling_params.n
    if n == 1:
        return list(request.request_ids)
    return [_sample_id(rid, j) for rid in request.request_ids for j in range(n)]


def _sample_id(request_id: str, sample: int) -> str:
    return f"{request_id}-{sample}"


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
            request_ids=[_sample_id(rid, j) for rid in request.request_ids],
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
