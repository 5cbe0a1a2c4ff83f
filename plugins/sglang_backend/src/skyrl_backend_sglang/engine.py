"""The SGLang engine: every engine hook on ``sglang.Engine`` in token-in-token-out mode.

SGLang's ``TokenizerManager`` binds itself to the first event loop that uses it, and its sockets
are not thread-safe. Callers, though, come from any loop (a trainer's, a Ray actor's, one per test).
So the engine owns one event loop on a private thread (:class:`EngineLoop`), every call into SGLang
runs there, and the hooks hand their coroutines over and await the result. A request crosses threads
once; its tokens stream inside the engine loop.

What SGLang cannot do in token-in mode is done here, with the canonical semantics:

* stop strings: streamed through :class:`~skyrl_backend_sglang.stop_strings.StopStringWatch`,
  aborted at the first match, trimmed;
* ``min_new_tokens`` and seeds: the plugin's logit processor
  (:mod:`skyrl_backend_sglang.logit_processor`);
* log-probabilities of the unaltered model whenever that processor or a repetition penalty changed
  the distribution SGLang reports: recomputed by a teacher-forced prefill (``max_new_tokens=0``).

Pausing and weight versions. ``keep`` is SGLang's in-place pause (requests keep their KV cache), or
its retract pause when the kept requests are to be recomputed (they go back to the waiting queue
and are prefilled again under the weights current at resume); ``abort`` is SGLang's own. Every
update carries the facade's version, which SGLang records per live request as it applies the
weights, and reports as spans on each finished request (:mod:`skyrl_backend_sglang.versions`); a
stream hands out a request's tokens at once until an update begins under it, and the rest with its
final chunk. Each request's ``cache_salt`` names the version it was submitted under, so no request
admitted after an update matches a radix-cache entry of older weights. A log-probability recomputed
by the teacher-forced prefill comes from the weights current at that prefill.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from skyrl_backends.checkpoint import declared_eos_token_ids, module_specs
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, EngineStateError, LoraAdapterError, SamplingParamsError
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.stopping import stop_on_last_token
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

from skyrl_backend_sglang import logprobs as lp
from skyrl_backend_sglang import versions
from skyrl_backend_sglang.logit_processor import SkyRLLogitProcessor
from skyrl_backend_sglang.stop_strings import StopStringWatch
from skyrl_backend_sglang.translation import (
    SGLangSampling,
    check_server_arg_names,
    engine_kwargs,
    is_cpu,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Memory release and resume move gigabytes; a stuck scheduler must not hang a trainer forever.
MEMORY_TIMEOUT_S = 120.0
# How long a required prefix-cache flush waits for the scheduler to become idle.
FLUSH_WAIT_S = 10.0
# Defaults for SGLang's CPU path, which cannot size its KV cache from device memory.
# No overlap scheduling on the CPU: there is no device to overlap with, and SGLang labels a token with
# its weight version when the step's result is processed, so under overlap a result still in flight
# when an in-place pause applies an update is labelled with the new version.
CPU_DEFAULTS = {"attention_backend": "torch_native", "max_total_tokens": 16384, "disable_cuda_graph": True,
                "disable_overlap_schedule": True}
# SGLang's memory tags for what the canonical tags name; CUDA graphs go with the weights they run.
_SGLANG_TAGS = {"weights": ("weights", "cuda_graph"), "kv_cache": ("kv_cache",)}


class EngineLoop:
    """An event loop on a private daemon thread, where every SGLang coroutine runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="skyrl-sglang-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine loop and await it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


@dataclasses.dataclass
class _Result:
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None
    text: str | None
    meta_info: dict[str, Any]
    mark: UpdateMark | None = None  # the weights' state when the request was submitted


class SGLangEngine:
    """One ``sglang.Engine``. Hook methods carry the ``skyrl_backends_`` prefix."""

    def __init__(self, config: GeneratorConfig) -> None:
        if config.model is None or not os.path.isdir(config.model):
            raise ConfigError("model", f"{config.model!r} is not a local model folder (nothing is downloaded).")
        self.config = config
        self.cpu = is_cpu(config)
        # Log-probabilities of the model itself (before temperature), as every backend reports them.
        # Read by SGLang's scheduler processes at import, so it must be set before they start.
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        if self.cpu:
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        import sglang
        from sglang.srt.server_args import ServerArgs

        # ServerArgs is a dataclass in 0.5.17 and a msgspec Struct in 0.5.23; both have a signature.
        server_arg_names = set(inspect.signature(ServerArgs).parameters)
        check_server_arg_names(set(config.engine_init_kwargs), server_arg_names)
        kwargs = engine_kwargs(config)
        if self.cpu:
            for key, value in CPU_DEFAULTS.items():
                kwargs.setdefault(key, value)
        from skyrl_backend_sglang import replayed_load

        # Colocated CUDA IPC updates are loaded by a replayed copy, where SGLang takes custom loaders.
        self._replays_loads = not self.cpu and replayed_load.SERVER_ARG in server_arg_names
        if self._replays_loads:
            replayed_load.register(kwargs)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.version = sglang.__version__
        import psutil

        # SGLang's own shutdown kills every child of this process, other engines' included; this
        # engine ends only the processes it started, found by comparing children before and after.
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.engine = sglang.Engine(**kwargs)
        # multiprocessing's resource tracker may start with the engine but serves the whole process.
        from multiprocessing import resource_tracker

        before.add(getattr(resource_tracker._resource_tracker, "_pid", None))
        self._pids = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
        atexit.unregister(self.engine.shutdown)
        atexit.register(self._stop_processes)
        self.tm = self.engine.tokenizer_manager
        self.loop = EngineLoop()
        self.eos_token_ids = sorted(_eos_token_ids(config.model, self.tokenizer))
        self.tp_size = int(kwargs.get("tp_size", 1))
        # 0.5.23 opens a weight-update session around tensor and broadcast updates; 0.5.17 has none.
        self.has_update_session = hasattr(self.tm, "begin_weight_update")
        self._processor = SkyRLLogitProcessor.to_str()
        self._live: set[str] = set()  # requests submitted to SGLang and not yet returned
        self._aborted: set[str] = set()
        self._pause_mode: str | None = None  # SGLang's pause mode while paused: in_place, retract, abort
        self._labels = versions.engine_labels_tokens(kwargs, self.cpu)
        self._updates = UpdateWatch()  # used on the engine loop only
        self._salted = "cache_salt" in inspect.signature(self.engine.async_generate).parameters
        self._flush_when_idle = False
        self._weight_specs: list[TensorSpec] | None = None
        self._weight_group: str | None = None
        # Adapters loaded from tensors live in SGLang under a name per version ("<name>@<n>"), so
        # a replacement is loaded before the adapter it replaces is unloaded (SGLang refuses a name
        # twice); requests ask for the current one.
        self._lora_serving: dict[str, str] = {}
        self._lora_folder_loads: set[str] = set()  # adapters SGLang holds under their own name
        self._lora_loads = 0

    # -- helpers -------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self.loop.call(coro)

    # -- generation ----------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest, engine_params: SGLangSampling) -> GenerateOutput:
        params = request.sampling_params
        plan = engine_params  # the plugin's translation (translation.py), made once by the facade
        self._check_prompts(request.prompt_token_ids, request.sampling_params.stop_token_ids)
        results = await self._on_loop(self._generate_all(request, plan))
        completions = []
        for rid, prompt, result in zip(request.request_ids, request.prompt_token_ids, results):
            completions.append(self._completion(rid, result, plan, params))
        if plan.rescore_logprobs:
            await self._on_loop(self._rescore(request, completions, plan))
        return GenerateOutput(completions)

    @hookimpl
    async def skyrl_backends_generate_stream(self, request: GenerateRequest,
                                             engine_params: SGLangSampling) -> AsyncIterator[StreamChunk]:
        """Every prompt streamed from SGLang (as stop strings already are), its new tokens handed
        out as they arrive. When the log-probabilities must be recomputed after the fact (the
        plugin's logit processor or a repetition penalty changed SGLang's), they exist only at the
        end: such a request's tokens then arrive in its final chunk."""
        params = request.sampling_params
        plan = engine_params
        self._check_prompts(request.prompt_token_ids, request.sampling_params.stop_token_ids)
        caller = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[int, list[int], Any, Any, int]] = asyncio.Queue()
        incremental = not plan.rescore_logprobs

        def emit(index: int, tokens: list[int], logprobs: Any, top: Any, version: int) -> None:  # engine loop
            caller.call_soon_threadsafe(pieces.put_nowait, (index, tokens, logprobs, top, version))

        rids = list(request.request_ids)
        job = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self._stream_all(request, plan, emit if incremental else None), self.loop.loop))
        sent = [0] * len(request)
        try:
            while not job.done() or not pieces.empty():
                if pieces.empty():
                    getter = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    index, tokens, logprobs, top, version = getter.result()
                else:
                    index, tokens, logprobs, top, version = pieces.get_nowait()
                sent[index] += len(tokens)
                labels = TokenVersions.uniform(len(tokens), version) if self._labels else None
                yield StreamChunk(index, tokens, logprobs, top, token_versions=labels)
            results = job.result()
        finally:
            if not job.done():  # the consumer stopped early: end the requests
                await self._on_loop(self._abort(rids))
        completions = [self._completion(rid, result, plan, params) for rid, result in zip(rids, results)]
        if plan.rescore_logprobs:
            await self._on_loop(self._rescore(request, completions, plan))
        for index, completion in enumerate(completions):
            yield StreamChunk.final(index, completion, sent[index])

    async def _stream_all(self, request: GenerateRequest, plan: SGLangSampling,
                          emit: Callable[[int, list[int], Any, Any, int], None] | None) -> list[_Result]:
        def on_tokens(index: int) -> Callable[[dict[str, Any], int, int, int], None] | None:
            if emit is None:
                return None

            def forward(chunk: dict[str, Any], start: int, end: int, version: int) -> None:
                tokens = list(chunk["output_ids"][start:end])
                logprobs = top = None
                if plan.return_logprob:
                    logprobs, top = lp.from_output(chunk.get("meta_info", {}), chunk["output_ids"][:end],
                                                   plan.top_logprobs_num)
                    logprobs, top = logprobs[start:], top[start:] if top is not None else None
                emit(index, tokens, logprobs, top, version)
            return forward

        return list(await asyncio.gather(*(
            self._submit([rid], [prompt], plan, self._served_lora(request.lora_name), streamed=True,
                         on_tokens=on_tokens(i))
            for i, (rid, prompt) in enumerate(zip(request.request_ids, request.prompt_token_ids)))))

    def _check_prompts(self, prompts: list[list[int]], stop_token_ids: tuple[int, ...] = ()) -> None:
        """Refuse what SGLang would crash or fail on: an out-of-vocabulary id takes its scheduler
        down (and with it this process), an over-long prompt is an error deep inside it."""
        vocab, context = self.tm.model_config.vocab_size, self.tm.context_len
        for i, prompt in enumerate(prompts):
            if max(prompt) >= vocab:
                bad = next(t for t in prompt if t >= vocab)
                raise ConfigError(f"prompt_token_ids[{i}]",
                                  f"token id {bad} is outside the vocabulary (size {vocab}).")
            if len(prompt) >= context:
                raise ConfigError(f"prompt_token_ids[{i}]",
                                  f"has {len(prompt)} tokens; the model's limit (max_model_len) is {context}. "
                                  "Shorten the prompt.")
        outside = [t for t in stop_token_ids if t >= vocab]
        if outside:  # never generated; with min_new_tokens the engine would index past its logits
            raise SamplingParamsError.out_of_range("stop_token_ids", list(stop_token_ids),
                                                   f"token ids below the vocabulary size ({vocab}); "
                                                   f"{outside[0]} is outside it")

    async def _generate_all(self, request: GenerateRequest, plan: SGLangSampling) -> list[_Result]:
        """One batched ``async_generate`` (the way SGLang is cheapest to drive); requests with stop
        strings stream one by one instead, each with its own watch."""
        rids, prompts, lora = list(request.request_ids), request.prompt_token_ids, self._served_lora(request.lora_name)
        if plan.streamed:
            return list(await asyncio.gather(*(self._submit([rid], [prompt], plan, lora, streamed=True)
                                               for rid, prompt in zip(rids, prompts))))
        return await self._submit(rids, prompts, plan, lora, streamed=False)

    def _request_kwargs(self, rids: list[str], prompts: list[list[int]], plan: SGLangSampling,
                        lora: str | None) -> dict[str, Any]:
        sp = dict(plan.sampling_params)
        if not sp.get("ignore_eos") and self.eos_token_ids:
            # SGLang stops on the EOS ids of the model config; the tokenizer's count too, as on
            # every other backend.
            sp["stop_token_ids"] = sorted(set(sp.get("stop_token_ids", ())) | set(self.eos_token_ids))
        kwargs: dict[str, Any] = {"input_ids": prompts, "sampling_params": sp, "rid": rids}
        if self._salted:  # this request's radix-cache entries are apart from other weights'
            kwargs["cache_salt"] = f"skyrl-weights-{self._updates.version}"
        if plan.needs_processor:
            # SGLang copies custom_params per request (and adds the request object to the copy).
            sp["custom_params"] = dict(plan.processor_params, eos_token_ids=self.eos_token_ids)
            kwargs["custom_logit_processor"] = self._processor
        if plan.return_logprob:
            kwargs["return_logprob"] = True
            if plan.top_logprobs_num:
                kwargs["top_logprobs_num"] = plan.top_logprobs_num
        if lora is not None:
            kwargs["lora_path"] = [lora] * len(rids)
        # A response ends at the context length ("length"), as on every backend; SGLang would
        # refuse the request instead.
        room = [self.tm.context_len - getattr(self.tm, "num_reserved_tokens", 0) - len(p) for p in prompts]
        if any(r < sp["max_new_tokens"] for r in room):
            kwargs["sampling_params"] = [dict(sp, max_new_tokens=max(1, min(sp["max_new_tokens"], r))) for r in room]
        return kwargs

    async def _submit(self, rids: list[str], prompts: list[list[int]], plan: SGLangSampling, lora: str | None,
                      streamed: bool, on_tokens: Callable[[dict[str, Any], int, int, int], None] | None = None) -> Any:
        await self._updates.wait_idle()  # submitted on settled weights, under their cache salt
        if self._flush_when_idle and not self._live:
            await self._flush()
        mark = self._updates.mark()
        kwargs = self._request_kwargs(rids, prompts, plan, lora)
        self._live.update(rids)
        try:
            if streamed:
                kwargs.update(input_ids=prompts[0], rid=rids[0])
                if isinstance(kwargs["sampling_params"], list):
                    kwargs["sampling_params"] = kwargs["sampling_params"][0]
                if lora is not None:
                    kwargs["lora_path"] = lora
                result = await self._generate_streamed(rids[0], kwargs, plan, mark, on_tokens)
                result.mark = mark
                return result
            outs = await self.engine.async_generate(**kwargs)
            return [dataclasses.replace(self._result(out), mark=mark) for out in outs]
        except asyncio.CancelledError:
            for rid in rids:
                self.tm.abort_request(rid)
            raise
        finally:
            self._live.difference_update(rids)
            self._aborted.difference_update(rids)
            if self._flush_when_idle and not self._live:
                await self._flush()

    async def _generate_streamed(self, rid: str, kwargs: dict[str, Any], plan: SGLangSampling, mark: UpdateMark,
                                 on_tokens: Callable[[dict[str, Any], int, int, int], None] | None = None,
                                 ) -> _Result:
        """Follow the request's cumulative outputs through the stop watch. ``on_tokens(chunk, start,
        end, version)`` gets every stretch of new tokens no stop condition can take back, while the
        request is still running and no weight update has begun since it started (the rest is left
        to the caller, with the result and SGLang's version spans)."""
        watch = StopStringWatch(plan.stop_strings, self._decode, plan.watched_stop_token_ids)
        last: dict[str, Any] | None = None
        handed_out = 0
        stream = await self.engine.async_generate(stream=True, **kwargs)
        async for chunk in stream:
            last = chunk
            if watch.match is None and watch.feed(chunk["output_ids"]) is not None:
                # Abort at once; keep reading so SGLang finishes the request's bookkeeping.
                self.tm.abort_request(rid)
            finished = bool(chunk.get("meta_info", {}).get("finish_reason"))
            if on_tokens is not None and watch.match is None and not finished and rid not in self._aborted \
                    and self._updates.unchanged_since(mark):
                end = len(chunk["output_ids"])
                if end > handed_out:
                    on_tokens(chunk, handed_out, end, mark.version)
                    handed_out = end
        assert last is not None
        result = self._result(last)
        if watch.match is not None and rid not in self._aborted:
            match = watch.match
            result.token_ids = result.token_ids[:match.num_tokens]
            result.finish_reason, result.stop_reason, result.text = "stop", match.stop, match.text
        return result

    def _result(self, out: dict[str, Any]) -> _Result:
        meta = out.get("meta_info", {})
        reason = meta.get("finish_reason") or {}
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        matched = reason.get("matched") if isinstance(reason, dict) else None
        finish = {"stop": "stop", "length": "length"}.get(kind or "", "abort")
        return _Result(token_ids=list(out.get("output_ids") or []), finish_reason=finish,
                       stop_reason=matched if isinstance(matched, int) else None, text=None, meta_info=meta)

    def _completion(self, rid: str, result: _Result, plan: SGLangSampling, params: SamplingParams) -> Completion:
        tokens = result.token_ids
        logprobs = top = None
        if plan.return_logprob and not plan.rescore_logprobs:
            logprobs, top = lp.from_output(result.meta_info, tokens, plan.top_logprobs_num)
        finish, stop_reason = stop_on_last_token(result.finish_reason, tokens, result.stop_reason, params,
                                                 self.eos_token_ids)
        if isinstance(stop_reason, int) and stop_reason not in params.stop_token_ids:
            stop_reason = None  # EOS: no stop reason, as on every backend
        return Completion(
            token_ids=tokens,
            finish_reason=finish,  # type: ignore[arg-type]
            logprobs=logprobs if plan.return_logprob else None,
            top_logprobs=top if plan.top_logprobs_num else None,
            text=(result.text if result.text is not None else self._decode(tokens)) if params.detokenize else None,
            stop_reason=stop_reason,
            request_id=rid,
            token_versions=self._versions(result, len(tokens)),
        )

    def _versions(self, result: _Result, count: int) -> TokenVersions | None:
        """SGLang's spans for the first ``count`` tokens, or, when no update has begun since the
        request started, the version it started under."""
        if not self._labels:
            return None
        spans = versions.from_meta(result.meta_info, count)
        if spans is not None:
            return spans
        if result.mark is not None and self._updates.unchanged_since(result.mark):
            return TokenVersions.uniform(count, result.mark.version)
        return None

    async def _rescore(self, request: GenerateRequest, completions: list[Completion], plan: SGLangSampling) -> None:
        """Teacher-forced log-probabilities of the generated tokens under the unaltered model."""
        async def one(prompt: list[int], completion: Completion) -> None:
            if not completion.token_ids:
                completion.logprobs = []
                completion.top_logprobs = [] if plan.top_logprobs_num else None
                return
            kwargs: dict[str, Any] = {
                "input_ids": prompt + completion.token_ids,
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True,
                # The entry at logprob_start_len itself carries no value; start one token earlier.
                "logprob_start_len": len(prompt) - 1,
            }
            if plan.top_logprobs_num:
                kwargs["top_logprobs_num"] = plan.top_logprobs_num
            if request.lora_name is not None:
                kwargs["lora_path"] = self._served_lora(request.lora_name)
            if self._salted:
                kwargs["cache_salt"] = f"skyrl-weights-{self._updates.version}"
            out = await self.engine.async_generate(**kwargs)
            chosen, top = lp.from_prefill(out["meta_info"], completion.token_ids, plan.top_logprobs_num)
            completion.logprobs = chosen
            completion.top_logprobs = top
        await asyncio.gather(*(one(p, c) for p, c in zip(request.prompt_token_ids, completions)))

    # -- abort and pause -----------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        await self._on_loop(self._abort(request_ids))

    async def _abort(self, request_ids: list[str] | None) -> None:
        if request_ids is None:
            request_ids = list(self._live)
        running = []
        for rid in request_ids:
            if rid in self._live:
                self._aborted.add(rid)
                if rid in self.tm.rid_to_state:
                    self.tm.abort_request(rid)
                    running.append(rid)
                else:
                    # Submitted but not registered yet: SGLang ignores aborts of unknown ids.
                    asyncio.get_running_loop().create_task(self._abort_when_registered(rid))
        if running and self._pause_mode in ("in_place", "retract"):
            await self._retire_while_paused(running, self._pause_mode)

    async def _retire_while_paused(self, rids: list[str], mode: str) -> None:
        """SGLang retires an aborted request at its next scheduling step, and a paused scheduler runs
        none: resume just long enough for the aborted requests to come back, then pause again."""
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

        await self.tm.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))
        try:
            deadline = asyncio.get_running_loop().time() + FLUSH_WAIT_S
            while any(rid in self.tm.rid_to_state for rid in rids) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.002)
        finally:
            await self.tm.pause_generation(PauseGenerationReqInput(mode=mode))

    async def _abort_when_registered(self, rid: str) -> None:
        while rid in self._live:
            if rid in self.tm.rid_to_state:
                self.tm.abort_request(rid)
                return
            await asyncio.sleep(0.002)

    @hookimpl
    async def skyrl_backends_pause_generation(self, mode: str, recompute: bool) -> None:
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        # keep: in place (running requests keep their KV cache and continue after resume), or
        # retract (their caches are dropped and rebuilt under the weights current at resume).
        # abort: SGLang aborts every request and holds new ones.
        sglang_mode = "abort" if mode == "abort" else ("retract" if recompute else "in_place")
        if sglang_mode == "abort":
            await self._on_loop(self._abort_until_idle())
        await self._on_loop(self.tm.pause_generation(PauseGenerationReqInput(mode=sglang_mode)))
        self._pause_mode = sglang_mode

    async def _abort_until_idle(self) -> None:
        """Abort every request and wait until none holds SGLang's model-update lock. SGLang's own
        abort pause aborts them too, then looks at that lock once a second: under running requests it
        returned a whole second after they had ended. Waited for here at a 2 ms grain, its first look
        finds the lock free."""
        await self._abort(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_WAIT_S
        while await self.tm.model_update_lock.is_locked() and loop.time() < deadline:
            await asyncio.sleep(0.002)

    @hookimpl
    async def skyrl_backends_resume_generation(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        await self._on_loop(self.tm.continue_generation(ContinueGenerationReqInput(torch_empty_cache=not self.cpu)))
        self._pause_mode = None

    # -- memory --------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqInput

        # SGLang's scheduler asserts it is idle on release (a failed assertion kills it); a flush
        # succeeds only when idle, so it doubles as the wait.
        await self._on_loop(self._flush(required=True))
        obj = ReleaseMemoryOccupationReqInput(tags=_sglang_tags(tags))
        await asyncio.wait_for(self._on_loop(self.tm.release_memory_occupation(obj, None)), MEMORY_TIMEOUT_S)

    @hookimpl
    async def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        from sglang.srt.managers.io_struct import ResumeMemoryOccupationReqInput

        obj = ResumeMemoryOccupationReqInput(tags=_sglang_tags(tags))
        await asyncio.wait_for(self._on_loop(self.tm.resume_memory_occupation(obj, None)), MEMORY_TIMEOUT_S)

    # -- weights -------------------------------------------------------------------------------
    @hookimpl
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        if self._weight_specs is None:
            self._weight_specs = hf_weight_specs(self.config.model, _dtype_name(self.tm.model_config.dtype))
        return self._weight_specs

    @hookimpl
    async def skyrl_backends_init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        from sglang.srt.managers.io_struct import InitWeightsUpdateGroupReqInput
        from skyrl_backends.weight_sync.nccl_transport import check_matches_trainer

        # SGLang set NCCL_CUMEM_ENABLE in this process when the engine started; its scheduler has
        # the same. A trainer whose NCCL differs cannot connect: say so before joining.
        check_matches_trainer(init_info, "SGLang's scheduler")
        obj = InitWeightsUpdateGroupReqInput(
            master_address=init_info.master_addr, master_port=init_info.master_port,
            rank_offset=init_info.rank_offset, world_size=init_info.world_size,
            group_name=init_info.group_name, backend=init_info.backend)
        success, message = await self._on_loop(self.tm.init_weights_update_group(obj, None))
        if not success:
            raise EngineStateError(f"SGLang could not join the weight-sync group {init_info.group_name!r}: {message}")
        self._weight_group = init_info.group_name

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest, version: int) -> None:
        from sglang.srt.managers import io_struct

        # While paused in place with requests in flight SGLang cannot flush (it flushes only when
        # idle): the flush then happens as soon as the last of them finishes. A retract pause leaves
        # nothing running, so the flush happens now and the retracted requests are prefilled anew.
        flush_now = not (self._pause_mode == "in_place" and self._live)
        labelled = {"weight_version": str(version)} if self._labels else {}
        if request.strategy != "broadcast":
            from sglang.srt.utils import MultiprocessingSerializer

            load_format = self._load_format(request)
            if request.strategy == "cuda_ipc":
                # Opening handles and queueing device copies takes milliseconds: done inline.
                named = self._received_tensors(request, whole_buckets=load_format is not None)
            else:
                named = await asyncio.to_thread(self._received_tensors, request)
            obj: Any = io_struct.UpdateWeightsFromTensorReqInput(
                serialized_named_tensors=[MultiprocessingSerializer.serialize(named) for _ in range(self.tp_size)],
                load_format=load_format, flush_cache=flush_now, **labelled)
            call = self.tm.update_weights_from_tensor
        else:
            if self._weight_group is None:
                raise EngineStateError("broadcast weight sync needs init_weight_update_communicator() first.")
            obj = io_struct.UpdateWeightsFromDistributedReqInput(
                names=list(request.names), dtypes=list(request.dtypes), shapes=[list(s) for s in request.shapes],
                group_name=self._weight_group, flush_cache=flush_now, **labelled)
            call = self.tm.update_weights_from_distributed
        success, message = await self._on_loop(self._update_labelled(call, obj, version))
        if not success:
            raise EngineStateError(f"SGLang failed to load the weights: {message}")
        if not flush_now:
            self._flush_when_idle = True

    def _load_format(self, request: WeightUpdateRequest) -> str | None:
        """The scheduler's loader for ``request``: the replayed load for buckets of a sender in this
        process that it keeps (the scheduler opens the same memory every time), else SGLang's own."""
        from skyrl_backends.weight_sync import replay
        from skyrl_backends.weight_sync.cuda_ipc import from_this_process, keeps_buffers

        from skyrl_backend_sglang import replayed_load

        if self._replays_loads and replay.enabled() and from_this_process(request) and keeps_buffers(request):
            return replayed_load.LOADER
        return None

    def _received_tensors(self, request: WeightUpdateRequest, whole_buckets: bool = False) -> list[tuple[str, Any]]:
        """The update's tensors, owned by this process: SGLang re-shares them with its scheduler
        (CUDA IPC or shared memory), which cannot re-export memory this process only maps (a shared
        memory buffer or another process's CUDA IPC handle), so received tensors are copied once.
        ``whole_buckets``: a sender's own buckets as ``replayed_load`` pairs, for its loader only."""
        if request.strategy == "tensors":
            return list(zip(request.names, request.payload))
        from skyrl_backends.weight_sync import receive_named_tensors
        from skyrl_backends.weight_sync.cuda_ipc import from_this_process

        device = "cpu" if self.cpu else "cuda"
        if request.strategy == "cuda_ipc" and from_this_process(request):
            # The trainer's sender lives in this process: its buckets are ours to share onwards, one
            # CUDA allocation per bucket that the scheduler opens once and finds again next step.
            if whole_buckets:
                from skyrl_backends.weight_sync.cuda_ipc import own_buckets

                from skyrl_backend_sglang import replayed_load

                return replayed_load.bucket_pairs(own_buckets(request, device))
            return list(receive_named_tensors(request, device=device))
        return [(name, tensor.to(device, copy=True))
                for name, tensor in receive_named_tensors(request, device=device)]

    async def _update_labelled(self, call: Any, obj: Any, version: int) -> tuple[bool, str]:
        """The update on the engine loop, with new requests held until it is done (they are
        submitted under the new version's cache salt) and the version adopted if it succeeds."""
        result: tuple[bool, str] = (False, "not applied")
        try:
            async with self._updates.updating(version):
                result = await self._update_in_session(call, obj)
                if not result[0]:
                    raise _UpdateRefused(result[1])
        except _UpdateRefused:
            pass
        return result

    async def _update_in_session(self, call: Any, obj: Any) -> tuple[bool, str]:
        if not self.has_update_session:
            return await call(obj, None)
        from sglang.srt.managers.io_struct import BeginWeightUpdateReqInput, EndWeightUpdateReqInput

        began, message = await self.tm.begin_weight_update(BeginWeightUpdateReqInput(), None)
        if not began:
            return False, f"begin_weight_update: {message}"
        try:
            return await call(obj, None)
        finally:
            ended, end_message = await self.tm.end_weight_update(EndWeightUpdateReqInput(), None)
            if not ended:
                logger.error("SGLang end_weight_update failed: %s", end_message)

    # -- LoRA ----------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> None:
        from sglang.srt.managers.io_struct import LoadLoRAAdapterReqInput

        out = await self._on_loop(self.tm.load_lora_adapter(
            LoadLoRAAdapterReqInput(lora_name=lora_name, lora_path=lora_path, pinned=pinned), None))
        if not getattr(out, "success", False):
            raise LoraAdapterError(f"SGLang could not load LoRA adapter {lora_name!r} from {lora_path}: "
                                   f"{getattr(out, 'error_message', out)}")
        self._lora_folder_loads.add(lora_name)

    def _served_lora(self, lora_name: str | None) -> str | None:
        return None if lora_name is None else self._lora_serving.get(lora_name, lora_name)

    @hookimpl
    async def skyrl_backends_load_lora_adapter_from_tensors(self, lora_name: str, lora_config: dict[str, Any],
                                                            request: WeightUpdateRequest, pinned: bool) -> None:
        """SGLang's own in-memory loading (``load_lora_adapter_from_tensors``, SGLang >= 0.5.23): the
        tensors are received here, copied into memory this process owns, and handed to SGLang's
        scheduler serialized per tensor-parallel rank, as weight updates are."""
        from sglang.srt.managers.io_struct import LoadLoRAAdapterFromTensorsReqInput
        from sglang.srt.utils import MultiprocessingSerializer

        named = await asyncio.to_thread(self._received_tensors, request)
        tensors = {name: tensor.clone() for name, tensor in named}  # owned: SGLang shares them onwards
        self._lora_loads += 1
        served = f"{lora_name}@{self._lora_loads}"
        obj = LoadLoRAAdapterFromTensorsReqInput(
            lora_name=served, config_dict=dict(lora_config), pinned=pinned,
            serialized_named_tensors=[MultiprocessingSerializer.serialize(tensors) for _ in range(self.tp_size)])
        out = await self._on_loop(self.tm.load_lora_adapter_from_tensors(obj, None))
        if not getattr(out, "success", False):
            raise LoraAdapterError(f"SGLang could not load LoRA adapter {lora_name!r} from tensors: "
                                   f"{getattr(out, 'error_message', out)}")
        replaced = self._lora_serving.get(lora_name, lora_name if lora_name in self._lora_folder_loads else None)
        self._lora_serving[lora_name] = served
        self._lora_folder_loads.discard(lora_name)
        if replaced is not None:  # new requests already ask for the new adapter
            await self._unload(replaced)

    @hookimpl
    async def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        await self._unload(self._lora_serving.pop(lora_name, lora_name))
        self._lora_folder_loads.discard(lora_name)

    async def _unload(self, served: str) -> None:
        from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqInput

        out = await self._on_loop(self.tm.unload_lora_adapter(UnloadLoRAAdapterReqInput(lora_name=served), None))
        if not getattr(out, "success", False):
            raise LoraAdapterError(f"SGLang could not unload LoRA adapter {served!r}: "
                                   f"{getattr(out, 'error_message', out)}")

    # -- cache and lifecycle -------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_reset_prefix_cache(self) -> None:
        await self._on_loop(self._flush(required=True))

    async def _flush(self, required: bool = False) -> None:
        # Right after an abort the scheduler may still be retiring requests; a required flush (before
        # sleep, or asked for) waits for it to go idle, for a bounded time.
        deadline = asyncio.get_running_loop().time() + (FLUSH_WAIT_S if required else 0.0)
        while True:
            out = await self.tm.flush_cache()
            if getattr(out, "success", True):
                self._flush_when_idle = False
                return
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if required:
            raise EngineStateError("SGLang flushes its prefix cache only when no request is running: "
                                   f"{getattr(out, 'message', '')} Abort or finish requests first.")

    @hookimpl
    def skyrl_backends_parallel_sizes(self) -> ParallelSizes:
        c = self.config
        return ParallelSizes(tensor=c.inference_engine_tensor_parallel_size,
                             pipeline=c.inference_engine_pipeline_parallel_size,
                             data=c.inference_engine_data_parallel_size,
                             expert=c.inference_engine_expert_parallel_size)

    @hookimpl
    def skyrl_backends_engine_version(self) -> str:
        return self.version

    @hookimpl
    async def skyrl_backends_teardown(self) -> None:
        await self._on_loop(self._abort(None))
        await asyncio.get_running_loop().run_in_executor(None, self._stop_processes)
        self.loop.stop()

    def _stop_processes(self, timeout_s: float = 20.0) -> None:
        import psutil

        # The watchdog first: it takes the whole process down when a scheduler dies.
        watchdog = getattr(self.tm, "_subprocess_watchdog", None)
        if watchdog is not None:
            watchdog.stop()
        procs = []
        for pid in self._pids:
            try:
                proc = psutil.Process(pid)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self._pids = []


class _UpdateRefused(Exception):
    """SGLang answered an update with success=False (the caller raises with its message)."""


def _sglang_tags(tags: list[str]) -> list[str]:
    return [t for tag in tags for t in _SGLANG_TAGS[tag]]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def hf_weight_specs(model_dir: str, dtype: str) -> list[TensorSpec]:
    """Every parameter under the trainer's (Hugging Face) names, with the engine's dtype.

    SGLang fuses parameters (``qkv_proj``, ``gate_up_proj``) and loads Hugging Face names through
    ``load_weights``; the names a trainer sends are those of the Hugging Face model, built here on
    the meta device (no memory, no weights read). Tied parameters are listed under every name, as a
    trainer's ``state_dict`` has them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return module_specs(model.named_parameters(remove_duplicate=False), lambda _, param: (tuple(param.shape), dtype))


def _eos_token_ids(model_dir: str, tokenizer: Any) -> set[int]:
    """EOS ids from the model config, its generation config and the tokenizer (all of them count)."""
    ids = declared_eos_token_ids(model_dir)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
