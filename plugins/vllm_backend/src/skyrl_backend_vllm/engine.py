"""The vLLM engine behind the skyrl_backends engine hooks.

One ``vllm.v1.engine.async_llm.AsyncLLM`` (the engine core and its workers run in their own
processes). Prompts go in as token ids; each prompt is one vLLM request whose id is the canonical
request id, so abort reaches it by name. Requests ask for the final output only
(``RequestOutputKind.FINAL_ONLY``): vLLM still returns the partial output of an aborted request,
with finish reason ``"abort"``, and nothing is streamed that nobody reads. Streaming
(``skyrl_backends_generate_stream``) asks for ``RequestOutputKind.DELTA`` outputs instead.

Text and stop strings. vLLM's detokenizer is primed with the prompt; when the prompt's text ends in
an incomplete UTF-8 character (a byte-level BPE prompt cut mid-character), vLLM 0.32 emits the whole
prompt's text as part of the response, and matches stop strings against it. So the response text is
decoded here from the response tokens alone (vLLM skips detokenizing: ``detokenize=False``), and stop
strings are left to vLLM only where its matching is the canonical one: the prompt's text ends cleanly
and no ``min_new_tokens`` is set (vLLM defers stop strings until ``min_tokens`` too, the canonical
rule does not). Otherwise the plugin streams the tokens through the core's exact matcher
(:class:`~skyrl_backends.stopping.StopStringMatcher`) and aborts the request at the match.

Weights reach the workers through vLLM's weight-transfer API with the plugin's ``"skyrl"``
weight-transfer engine where the installed vLLM has that API, else through the plugin's worker
extension and ``collective_rpc`` (:mod:`skyrl_backend_vllm.weight_transfer.updates`), with generation
paused (mode ``keep``) around the load and the version label (:mod:`skyrl_backend_vllm.versions`), so
vLLM's per-token version stamps are exact. Every request carries a ``cache_salt`` naming the weight
version it was submitted under, so no request admitted after an update matches a cached block
computed with older weights, while requests kept across the update keep their own blocks.

Pause modes: ``keep`` and ``abort`` are vLLM's (its scheduler's pause, without the fixed 20 ms that
``AsyncLLM.pause_generation`` adds: :func:`pause_scheduler`), keep with ``clear_cache=True`` when
the kept requests are to be recomputed (vLLM then preempts them, and they are prefilled again under
the weights current at resume). vLLM's ``wait`` finishes only the requests
already running (queued ones stay queued until resume), so the facade's ``wait``, which lets every
admitted request finish, is used instead.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from skyrl_backends.checkpoint import checkpoint_specs
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, LoraAdapterError, SamplingParamsError, closest_match
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.stopping import StopStringMatcher
from skyrl_backends.types import (
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    StreamChunk,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)
from skyrl_backends.version_labels import UpdateMark, UpdateWatch

from skyrl_backend_vllm import options, outputs, transfer, versions
from skyrl_backend_vllm.adapters import AdapterFolder
from skyrl_backend_vllm.engine_platform import detect_platform
from skyrl_backend_vllm.weight_transfer import updates as weight_updates

logger = logging.getLogger(__name__)

# Aborting an id the engine core has not registered yet is a no-op in vLLM: a request caught
# between submission and registration, or whose submission the engine core queued while paused,
# would run on. So an abort is repeated, with growing intervals, until the request has ended.
_ABORT_RETRY_S = 0.05
_ABORT_RETRY_MAX_S = 0.5
_MAX_REMEMBERED_ABORTS = 10_000
_REAP_TIMEOUT_S = 15.0


class VLLMEngine:
    """One AsyncLLM. Hook methods carry the ``skyrl_backends_`` prefix."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.platform = detect_platform(config)
        options.prepare_process_environment(self.platform)
        kwargs = options.engine_kwargs(config, self.platform)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # How updates reach the workers (skyrl_backend_vllm.weight_transfer.updates).
        self.weight_path = weight_updates.choose_path(self.platform)
        if self.weight_path == "weight_transfer":
            kwargs.update(weight_updates.engine_kwargs())
        _check_engine_args(kwargs, AsyncEngineArgs)
        before = _child_processes()
        self._engine: Any = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._weight_updates = (weight_updates.WeightTransferUpdates(self._engine)
                                if self.weight_path == "weight_transfer" else None)
        # The engine core and its workers, so teardown can make sure they are gone.
        self._processes = [p for pid, p in _child_processes().items() if pid not in before]
        model_config = self._engine.model_config
        self.served_dtype = str(model_config.dtype).removeprefix("torch.")
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_logprobs = options.max_logprobs(config)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self._inflight: set[str] = set()
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._loras: dict[str, Any] = {}
        self._next_lora_id = 1
        self._adapter_folders: dict[str, AdapterFolder] = {}  # adapters loaded from tensors
        self._background: set[asyncio.Task] = set()
        self._labels = versions.engine_labels_tokens()
        self._updates = UpdateWatch()
        self._pause_mode: str | None = None
        self._asleep: set[str] = set()  # vLLM keeps its scheduler paused while anything sleeps

    # -- generation ----------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest, engine_params: dict[str, Any]) -> GenerateOutput:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_prompts(request.prompt_token_ids, request.sampling_params.stop_token_ids)
        params = request.sampling_params
        kwargs = dict(engine_params)  # the plugin's translation (skyrl_backend_vllm.sampling), made by the facade
        stop = kwargs.pop("stop", None)
        kwargs.pop("include_stop_str_in_output", None)
        # Text is decoded here (see the module docstring), so vLLM only detokenizes to match stop strings.
        plain = SamplingParams(**kwargs, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
        native_stop = streamed_stop = None
        if stop:
            native_stop = SamplingParams(**kwargs, stop=stop, include_stop_str_in_output=True,
                                         output_kind=RequestOutputKind.FINAL_ONLY)
            streamed_stop = SamplingParams(**kwargs, detokenize=False, output_kind=RequestOutputKind.DELTA)
        lora_request = self._loras[request.lora_name] if request.lora_name is not None else None

        async def one(prompt: list[int], request_id: str) -> Completion:
            if not stop:
                return await self._generate_one(prompt, plain, request_id, lora_request, params.logprobs,
                                                decode=params.detokenize)
            if params.min_new_tokens == 0 and not self._ends_mid_character(prompt):
                return await self._generate_one(prompt, native_stop, request_id, lora_request, params.logprobs,
                                                vllm_text=True)
            return await self._generate_matching_stop(prompt, streamed_stop, stop, request_id, lora_request,
                                                      params.logprobs)

        completions = await asyncio.gather(*(one(p, rid) for p, rid in
                                             zip(request.prompt_token_ids, request.request_ids)))
        return GenerateOutput(list(completions))

    async def _generate_one(self, prompt: list[int], vllm_params: Any, request_id: str, lora_request: Any,
                            top_n: int | None, vllm_text: bool = False, decode: bool = True) -> Completion:
        """One prompt to its completion; ``decode=False`` leaves the text out (the caller asked for
        token ids only, ``detokenize=False``; the facade returns no text then)."""
        await self._updates.wait_idle()  # submitted on settled weights, under their cache salt
        if request_id in self._aborted:  # aborted before it was submitted
            self._aborted.pop(request_id, None)
            return outputs.empty_aborted(request_id, top_n)
        mark = self._updates.mark()
        self._inflight.add(request_id)
        final = None
        try:
            async for out in self._engine.generate(self._prompt(prompt), vllm_params, request_id,
                                                   lora_request=lora_request):
                final = out
        finally:
            self._inflight.discard(request_id)
            self._aborted.pop(request_id, None)
        if final is None or not final.outputs:
            return outputs.empty_aborted(request_id, top_n)
        completion = outputs.to_completion(final.outputs[0], request_id, top_n)
        completion.token_versions = self._versions(final.outputs[0], len(completion.token_ids), mark)
        if not decode:
            completion.text = None
        elif not vllm_text or completion.finish_reason != "stop" or not isinstance(completion.stop_reason, str):
            completion.text = self._decode(completion.token_ids)
        return completion

    def _prompt(self, prompt: list[int]) -> dict[str, Any]:
        # The salt keeps this request's prefix-cache blocks apart from those of other weights.
        return {"prompt_token_ids": prompt, "cache_salt": f"skyrl-weights-{self._updates.version}"}

    def _versions(self, output: Any, count: int, mark: UpdateMark) -> TokenVersions | None:
        """The versions of a request's first ``count`` tokens: vLLM's spans, or, when no update has
        begun since the request started, the version it started under."""
        if not self._labels:
            return None
        spans = versions.from_spans(output, count)
        if spans is not None:
            return spans
        return TokenVersions.uniform(count, mark.version) if self._updates.unchanged_since(mark) else None

    @hookimpl
    async def skyrl_backends_generate_stream(self, request: GenerateRequest,
                                             engine_params: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        """Every prompt as a ``RequestOutputKind.DELTA`` request, its new tokens handed out per engine
        step; stop strings go through the exact matcher (tokens before a match are never cut)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_prompts(request.prompt_token_ids, request.sampling_params.stop_token_ids)
        params = request.sampling_params
        kwargs = dict(engine_params)
        stop = kwargs.pop("stop", None) or []
        kwargs.pop("include_stop_str_in_output", None)
        delta = SamplingParams(**kwargs, detokenize=False, output_kind=RequestOutputKind.DELTA)
        lora_request = self._loras[request.lora_name] if request.lora_name is not None else None
        chunks: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()

        async def one(index: int, prompt: list[int], request_id: str) -> None:
            sent = 0

            def emit(tokens: list[int], per_token: list[Any], version: int | None) -> None:
                nonlocal sent
                logprobs, top = outputs.split_logprobs(tokens[sent:], per_token[sent:], params.logprobs)
                labels = TokenVersions.uniform(len(tokens) - sent, version) if version is not None else None
                chunks.put_nowait(StreamChunk(index, tokens[sent:], logprobs, top, token_versions=labels))
                sent = len(tokens)

            try:
                completion = await self._generate_matching_stop(prompt, delta, stop, request_id, lora_request,
                                                                params.logprobs, emit)
                chunks.put_nowait(StreamChunk.final(index, completion, sent))
            except BaseException as error:
                chunks.put_nowait(error)
                raise

        tasks = [asyncio.ensure_future(one(i, p, rid))
                 for i, (p, rid) in enumerate(zip(request.prompt_token_ids, request.request_ids))]
        try:
            for _ in range(len(tasks)):
                while True:
                    chunk = await chunks.get()
                    if isinstance(chunk, BaseException):
                        raise chunk
                    yield chunk
                    if chunk.completion is not None:
                        break
        finally:
            for task in tasks:
                task.cancel()  # an early close: closing a vLLM stream aborts its request

    async def _generate_matching_stop(self, prompt: list[int], vllm_params: Any, stop: list[str], request_id: str,
                                      lora_request: Any, top_n: int | None,
                                      emit: Callable[[list[int], list[Any], int | None], None] | None = None,
                                      ) -> Completion:
        """Stream the response (``DELTA`` outputs) through the exact stop-string matcher; abort at the
        first match. ``emit(tokens, per_token_logprobs, version)`` is called whenever tokens were
        added that no stop condition can take back and whose weight version is known (once an
        update has begun under the request, its tokens wait for the final output's spans)."""
        await self._updates.wait_idle()
        if request_id in self._aborted:
            self._aborted.pop(request_id, None)
            return outputs.empty_aborted(request_id, top_n)
        mark = self._updates.mark()
        matcher = StopStringMatcher(stop, self._decode)
        tokens: list[int] = []
        per_token: list[Any] = []
        finish, stop_reason, text = "abort", None, None
        final: Any = None
        self._inflight.add(request_id)
        try:
            stream = self._engine.generate(self._prompt(prompt), vllm_params, request_id, lora_request=lora_request)
            async for out in stream:
                o = out.outputs[0]
                if finish == "stop":  # after the match: only the final output's version spans matter
                    final = o if out.finished else final
                    continue
                new = list(o.token_ids)
                for i, token in enumerate(new):
                    tokens.append(token)
                    if o.logprobs is not None:
                        per_token.append(o.logprobs[i])
                    # A stop token id or EOS ends the sequence before any stop string is checked.
                    if o.finish_reason == "stop" and i == len(new) - 1:
                        break
                    match = matcher.feed(tokens)
                    if match is not None:
                        finish, (stop_reason, text) = "stop", match
                        break
                if finish == "stop":
                    if out.finished:
                        final = o
                    else:  # end the request; its final (aborted) output still comes, with its spans
                        await self._engine.abort(request_id)
                    continue
                if o.finish_reason is not None:
                    finish = o.finish_reason if o.finish_reason in ("stop", "length") else "abort"
                    stop_reason = o.stop_reason if finish == "stop" else None
                    final = o
                elif emit is not None and new and self._updates.unchanged_since(mark):
                    emit(tokens, per_token, mark.version if self._labels else None)
        finally:
            self._inflight.discard(request_id)
            self._aborted.pop(request_id, None)
        logprobs, top = outputs.split_logprobs(tokens, per_token if top_n is not None else None, top_n)
        return Completion(token_ids=tokens, finish_reason=finish, logprobs=logprobs, top_logprobs=top,  # type: ignore[arg-type]
                          text=text if text is not None else self._decode(tokens), stop_reason=stop_reason,
                          request_id=request_id, token_versions=self._versions(final, len(tokens), mark))

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _ends_mid_character(self, prompt: list[int]) -> bool:
        """Whether the prompt's text ends in an incomplete UTF-8 character (a UTF-8 character spans
        at most four byte-level tokens, so the last few tokens decide)."""
        return self.tokenizer.decode(prompt[-8:], skip_special_tokens=True).endswith("\ufffd")

    def _check_prompts(self, prompts: list[list[int]], stop_token_ids: tuple[int, ...] = ()) -> None:
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.max_model_len:
                raise ConfigError(f"prompt_token_ids[{i}]",
                                  f"has {len(prompt)} tokens; the engine's max_model_len is {self.max_model_len}. "
                                  "Shorten the prompt or raise max_model_len.")
            bad = next((t for t in prompt if t >= self.vocab_size), None)
            if bad is not None:
                raise ConfigError(f"prompt_token_ids[{i}]",
                                  f"token id {bad} is outside the vocabulary (size {self.vocab_size}).")
        outside = [t for t in stop_token_ids if t >= self.vocab_size]
        if outside:  # never generated; with min_new_tokens the engine would index past its logits
            raise SamplingParamsError.out_of_range("stop_token_ids", list(stop_token_ids),
                                                   f"token ids below the vocabulary size ({self.vocab_size}); "
                                                   f"{outside[0]} is outside it")

    # -- abort and pause -----------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        ids = sorted(self._inflight) if request_ids is None else list(request_ids)
        if not ids:
            return
        for rid in ids:
            if rid not in self._inflight:
                self._remember_abort(rid)
        logger.debug("abort %s (in flight: %s)", ids, sorted(self._inflight))
        await self._engine.abort(ids)
        task = asyncio.create_task(self._repeat_abort(set(ids)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _remember_abort(self, request_id: str) -> None:
        self._aborted[request_id] = None
        while len(self._aborted) > _MAX_REMEMBERED_ABORTS:
            self._aborted.popitem(last=False)

    async def _repeat_abort(self, ids: set[str]) -> None:
        delay = _ABORT_RETRY_S
        while self._engine is not None:
            await asyncio.sleep(delay)
            pending = ids & self._inflight
            if not pending or self._engine is None:
                return
            logger.debug("abort again %s", sorted(pending))
            await self._engine.abort(sorted(pending))
            delay = min(delay * 2, _ABORT_RETRY_MAX_S)

    @hookimpl
    async def skyrl_backends_pause_generation(self, mode: str, recompute: bool) -> None:
        # "keep": in-flight requests stay scheduled-but-frozen with their KV caches and continue on
        # resume. Clearing the cache (recompute) preempts them: vLLM prefills each again, prompt and
        # tokens so far, under the weights current when it resumes. "abort": vLLM ends every request.
        await pause_scheduler(self._engine, mode, clear_cache=recompute)
        self._pause_mode = mode

    @hookimpl
    async def skyrl_backends_resume_generation(self) -> None:
        await self._engine.resume_generation()
        self._pause_mode = None

    # -- memory --------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        # vLLM sleeps as a whole (weights offloaded at level 1, dropped at level 2; KV cache freed);
        # the facade only passes all tags, since the backend declares no tag-wise sleep.
        await self._engine.sleep(level=level)
        self._asleep.update(("weights", "kv_cache"))

    @hookimpl
    async def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        await self._engine.wake_up(tags=list(tags))
        self._asleep.difference_update(tags)

    # -- weights -------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        return checkpoint_specs(self.config.model, self.served_dtype)

    @hookimpl
    async def skyrl_backends_init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        if self._weight_updates is not None:
            await self._weight_updates.init(init_info)
            return
        await self._engine.collective_rpc("skyrl_init_communicator", args=(pickle.dumps(init_info),))

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest, version: int) -> None:
        # Loaded with generation paused, so no step runs between the new weights and their label
        # (an engine with memory asleep is paused by vLLM itself until it is all awake again). With
        # no request in flight there is no step to stop: new requests wait for the update
        # (``wait_idle``).
        pause_here = self._pause_mode is None and not self._asleep and bool(self._inflight)
        async with self._updates.updating(version):
            if not self._inflight:
                # No request runs, and none starts until the update ends (``wait_idle``): every cached
                # block is the old weights', whether the reset runs before the load or after it. So it
                # goes out with the load instead of one round trip to the engine core after it.
                await _together(self._load_and_label(request, version), self._engine.reset_prefix_cache())
                return
            if pause_here:
                await pause_scheduler(self._engine, "keep", clear_cache=False)
            try:
                await self._load_and_label(request, version)
            finally:
                if pause_here:
                    await self._engine.resume_generation()
            if not self._inflight:
                # Frees the old weights' blocks; the version in every request's cache salt is what
                # keeps later requests from matching them while kept requests still hold some.
                await self._engine.reset_prefix_cache()

    async def _load_and_label(self, request: WeightUpdateRequest, version: int) -> None:
        await self._load_weights(request)
        if self._labels:
            await self._engine.update_weight_version(str(version))

    async def _load_weights(self, request: WeightUpdateRequest) -> None:
        if self._weight_updates is not None:  # vLLM's weight-transfer API
            await _with_worker_errors(self._weight_updates.apply(request))
            return
        if request.strategy == "tensors":
            message = await asyncio.to_thread(transfer.pack_tensors, request.names, request.payload)
        else:
            message = transfer.pack_request(request)
        with message:
            await self._worker_call("skyrl_apply_weights", message.message)

    # -- LoRA ----------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> None:
        from vllm.lora.request import LoRARequest

        self._check_adapter_room(lora_name)
        lora_request = LoRARequest(lora_name=lora_name, lora_int_id=self._next_lora_id, lora_path=lora_path)
        self._next_lora_id += 1
        try:
            added = await self._engine.add_lora(lora_request)
        except Exception as exc:
            raise LoraAdapterError(f"vLLM could not load LoRA adapter {lora_name!r} from {lora_path}: {exc}") from exc
        if added is False:
            raise LoraAdapterError(f"vLLM refused LoRA adapter {lora_name!r} from {lora_path}.")
        if pinned:
            await self._engine.pin_lora(lora_request.lora_int_id)
        self._loras[lora_name] = lora_request

    @hookimpl
    async def skyrl_backends_load_lora_adapter_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                                            request: WeightUpdateRequest, pinned: bool) -> None:
        """The workers receive the tensors and write them as a PEFT folder; vLLM loads that folder
        (in place of the adapter it replaces: vLLM loads the new one before dropping the old)."""
        from vllm.lora.request import LoRARequest

        self._check_adapter_room(lora_name)
        folder = self._adapter_folders.setdefault(lora_name, AdapterFolder())
        staged = folder.stage(lora_config)
        if request.strategy == "tensors":
            message = await asyncio.to_thread(transfer.pack_tensors, request.names, request.payload)
        else:
            message = transfer.pack_request(request)
        with message:
            await self._worker_call("skyrl_save_adapter", message.message, staged)
        previous = self._loras.get(lora_name)
        lora_id = previous.lora_int_id if previous is not None else self._next_lora_id
        replaced = folder.publish(staged)
        try:
            added = await self._engine.add_lora(LoRARequest(lora_name=lora_name, lora_int_id=lora_id,
                                                            lora_path=folder.path, load_inplace=previous is not None))
            if added is False:
                raise LoraAdapterError(f"vLLM refused LoRA adapter {lora_name!r} from tensors.")
        except Exception as exc:
            if replaced is not None:
                folder.publish(replaced)  # vLLM still serves the previous adapter: its path shows it again
            folder.keep_only(replaced)
            if isinstance(exc, LoraAdapterError):
                raise
            raise LoraAdapterError(f"vLLM could not load LoRA adapter {lora_name!r} from tensors: {exc}") from exc
        if previous is None:
            self._next_lora_id += 1
        if pinned:
            await self._engine.pin_lora(lora_id)
        folder.keep_only(staged, replaced)
        # Requests name the adapter by this id without load_inplace (which would reload it every step).
        self._loras[lora_name] = LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=folder.path)
        if previous is not None:  # cached blocks are keyed by adapter id, and were computed with the old one
            await self.skyrl_backends_reset_prefix_cache()

    def _check_adapter_room(self, lora_name: str) -> None:
        """Where vLLM has a spare adapter slot that must stay empty (options.spare_lora_slots: its CPU
        path), at most ``max_loras`` adapters are loaded at once; another is refused, not left to evict."""
        if (options.spare_lora_slots(self.platform) and lora_name not in self._loras
                and len(self._loras) >= self.config.max_loras):
            raise LoraAdapterError(
                f"{len(self._loras)} LoRA adapters are loaded ({sorted(self._loras)}), the engine's max_loras: "
                f"unload one before loading {lora_name!r}, or create the engine with a larger max_loras.")

    async def _worker_call(self, method: str, *args: Any) -> Any:
        return await _with_worker_errors(self._engine.collective_rpc(method, args=args))

    @hookimpl
    async def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        lora_request = self._loras.get(lora_name)
        if lora_request is None:
            raise LoraAdapterError(f"No LoRA adapter named {lora_name!r} is loaded.")
        await self._engine.remove_lora(lora_request.lora_int_id)
        del self._loras[lora_name]
        folder = self._adapter_folders.pop(lora_name, None)
        if folder is not None:
            folder.remove()

    # -- the rest ------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_reset_prefix_cache(self) -> None:
        # Running requests are preempted and recomputed, so the reset always succeeds and no
        # cached block survives it.
        await self._engine.reset_prefix_cache(reset_running_requests=True)

    @hookimpl
    def skyrl_backends_parallel_sizes(self) -> ParallelSizes:
        c = self.config
        return ParallelSizes(c.inference_engine_tensor_parallel_size, c.inference_engine_pipeline_parallel_size,
                             c.inference_engine_data_parallel_size, c.inference_engine_expert_parallel_size)

    @hookimpl
    def skyrl_backends_engine_version(self) -> str:
        import vllm

        return vllm.__version__

    @hookimpl
    async def skyrl_backends_teardown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if self._weight_updates is not None:
            self._weight_updates.close()
        if self._inflight:
            await engine.abort(sorted(self._inflight))
        for task in list(self._background):
            task.cancel()
        # vLLM's shutdown signals its processes and joins them (seconds): off the event loop, which
        # other engines of this process (and the requests failing over to them) share. vLLM closes
        # its sockets and tasks on the loop that owns them when called from another thread. Its
        # output handler, which shutdown cancels last, is cancelled first, here on its loop, so it
        # does not log the engine core it watches dying as a failure meanwhile.
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await asyncio.to_thread(engine.shutdown)
        for folder in self._adapter_folders.values():
            folder.remove()
        self._adapter_folders.clear()
        # Wait until they are really gone (a worker still exiting holds memory, and on GPU the
        # device), and kill any that hang.
        await asyncio.to_thread(_reap, self._processes)


async def pause_scheduler(engine: Any, mode: str, clear_cache: bool) -> None:
    """vLLM's pause in ``mode`` (``keep``: the running requests stay where they are until resume;
    ``abort``: they end), without the fixed 20 ms that ``AsyncLLM.pause_generation`` adds.

    ``pause_generation`` pauses the engine core's scheduler and then sleeps 20 ms so that the outputs
    of requests that end at the pause reach their callers before it returns (vLLM's comment: for
    ordering, not correctness). In mode keep no request ends, and under asynchronous RL every update
    under running requests froze them all for those 20 ms; in mode abort the facade returns only
    once the callers have their requests' ends anyway. So the scheduler is paused directly, where the
    engine core's client has the call (vLLM 0.26 and 0.32 do); tokens keep their versions, which the
    engine core stamps at each step (:mod:`skyrl_backend_vllm.versions`). With ``clear_cache`` vLLM
    also clears its multimodal cache on the way, so that case keeps vLLM's own call."""
    pause = getattr(getattr(engine, "engine_core", None), "pause_scheduler_async", None)
    if clear_cache or pause is None:
        await engine.pause_generation(mode=mode, clear_cache=clear_cache)
        return
    await pause(mode=mode, clear_cache=False)


async def _together(first: Any, second: Any) -> None:
    """Await both, each to its end (neither is left running when the other fails); raise the
    first one's error, else the second's."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _with_worker_errors(call: Any) -> Any:
    """Await ``call``; workers run in other processes and their exceptions come back as text: give
    the trainer the same WeightUpdateError (with its offending tensors) the worker raised."""
    try:
        return await call
    except Exception as exc:
        from skyrl_backends.weight_sync.manifest import weight_update_error_from_text

        recovered = weight_update_error_from_text(str(exc))
        if recovered is None:
            raise
        raise recovered from exc


def _child_processes() -> dict[int, Any]:
    import psutil

    processes = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(process.cmdline()):
                processes[process.pid] = process
        except psutil.Error:
            continue
    return processes


def _reap(processes: list[Any], timeout: float = _REAP_TIMEOUT_S) -> None:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        logger.warning("vLLM process %d did not exit after shutdown; killing it", process.pid)
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def _check_engine_args(kwargs: dict[str, Any], engine_args_cls: type) -> None:
    """Name an engine_init_kwargs key that vLLM does not know, before vLLM fails on it."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(engine_args_cls)}
    for key in kwargs:
        if key not in known:
            hint = closest_match(key, known)
            raise ConfigError(f"engine_init_kwargs.{key}",
                              "is not an argument of vLLM's engine" + (f"; did you mean {hint!r}?" if hint else "."))
