"""An engine behind an unmodified SGLang server (``python -m sglang.launch_server``; 0.5.23, and the
GPU machine's 0.5.17): the engine hooks over SGLang's own HTTP API.

The server must run in token-in mode (``--skip-tokenizer-init``) with the raw model's
log-probabilities (``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` in its environment);
:func:`skyrl_backends.remote.native.launch.server_command` starts it so. How each hook is spoken:

========================================  ==============================================================
hook                                      SGLang route
========================================  ==============================================================
generate, generate_stream                 ``POST /generate`` per sequence with ``input_ids``, ``rid``,
                                          ``return_logprob``/``top_logprobs_num``, ``lora_path`` (the
                                          adapter's name); streamed (``stream``) when this side must
                                          stop the sequence: stop strings (token-in SGLang cannot match
                                          them) and stop ids under ``ignore_eos`` (which SGLang's
                                          ``ignore_eos`` disables), matched here and then aborted
abort                                     ``POST /abort_request`` (``rid``, or ``abort_all``); while
                                          paused, SGLang retires aborted requests only when it steps:
                                          ``/continue_generation`` until they returned, paused again
pause_generation / resume                 ``POST /pause_generation`` mode ``in_place`` (keep),
                                          ``retract`` (keep with recompute) or ``abort``;
                                          ``POST /continue_generation``
sleep / wake_up                           ``POST /flush_cache`` (SGLang releases only when idle), then
                                          ``/release_memory_occupation``, ``/resume_memory_occupation``
                                          with tags (GPU servers with ``--enable-memory-saver``)
init_weight_update_communicator           ``POST /init_weights_update_group`` (the trainer's gloo or NCCL
                                          group)
update_named_weights                      ``broadcast``: ``POST /update_weights_from_distributed``, one
                                          typed broadcast per tensor (layout ``per_tensor``); in-process
                                          tensors on the server's machine: ``POST
                                          /update_weights_from_tensor`` (tensors shared through memory);
                                          both with the facade's version as ``weight_version``
load / unload_lora_adapter                ``POST /load_lora_adapter``, ``/unload_lora_adapter``
reset_prefix_cache                        ``POST /flush_cache``
========================================  ==============================================================

What SGLang does otherwise than the engine API is declared absent rather than approximated:
``repetition_penalty`` (SGLang penalizes the response only, the canonical one prompt and response).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.checkpoint import declared_dtype, declared_eos_token_ids, model_folder_json
from skyrl_backends.errors import (
    ConfigError,
    EngineStateError,
    LoraAdapterError,
    SamplingParamsError,
    UnsupportedCapabilityError,
    WeightUpdateError,
)
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.remote.native.engine import ServerEngine, ServerInfo, empty_aborted
from skyrl_backends.remote.native.http import ServerAnswer, ServerHTTP
from skyrl_backends.remote.native.text import ResponseText
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.stopping import StopStringMatcher, stop_on_last_token
from skyrl_backends.types import (
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    StreamChunk,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)

PROTOCOL = "sglang"
MAX_TOP_LOGPROBS = 20
# How long an abort while paused lets SGLang step for the aborted requests to come back.
_RETIRE_WAIT_S = 10.0
_FINISH_REASONS = ("stop", "length", "abort")


def describe(http: ServerHTTP, wait_ready_s: float, same_host: bool) -> ServerInfo:
    http.wait_ready("/health", wait_ready_s)
    answer = _get_either(http, "/server_info", "/get_server_info")  # the second before 0.5.23
    if not answer.ok or not isinstance(answer.body, Mapping):
        raise ConfigError("remote_inference_engine_urls", f"{http.base_url}/server_info answered HTTP {answer.status}: "
                                                          f"{answer.message()}; is it an SGLang server?")
    args = answer.body
    if not args.get("skip_tokenizer_init"):
        raise ConfigError("remote_inference_engine_urls",
                          f"{http.base_url} detokenizes its outputs itself; token ids in and out need "
                          f"`python -m sglang.launch_server ... --skip-tokenizer-init`")
    model = _get_either(http, "/model_info", "/get_model_info")
    model_info = model.body if model.ok and isinstance(model.body, Mapping) else {}
    cpu = str(args.get("device", "cuda")) == "cpu"
    sleeps = not cpu and bool(args.get("enable_memory_saver"))
    # In-process tensors: CPU ones travel inside the request (any machine), CUDA ones as CUDA IPC
    # handles (the server's machine only; checked per update).
    strategies = ["tensors", "broadcast"]
    capabilities = Capabilities(
        sleep_levels=(1, 2) if sleeps else (),
        # SGLang has no sleep levels: releasing the weights always discards them.
        discards_weights_at_level=1 if sleeps else None,
        sleep_tags=sleeps,
        sleep_clears_prefix_cache=sleeps,  # the sleep hook flushes first (SGLang releases only when idle)
        lora=bool(args.get("enable_lora")),
        top_logprobs=True,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        stop_strings=True,
        # SGLang refuses min_new_tokens in token-in mode (it needs its tokenizer's EOS id).
        min_new_tokens=False,
        # SGLang's sampling_seed draws differently with what else is in the batch (the sglang backend
        # samples seeded requests itself, in a logit processor a server does not run).
        seeded_sampling=False,
        min_p=True,
        repetition_penalty=False,
        prefix_caching=not args.get("disable_radix_cache"),
        abort=True,
        native_pause=True,
        pause_modes=("abort",),
        recompute_on_resume=True,
        token_versions=_labels_tokens(args),
        weight_sync_strategies=tuple(strategies),
        broadcast_layouts=("per_tensor",),
        streaming=True,
    )
    path = model_info.get("model_path") or args.get("model_path")
    return ServerInfo(
        protocol=PROTOCOL, url=http.base_url, model=path, served_dtype=_served_dtype(args, path),
        engine_version=args.get("version"), capabilities=capabilities,
        parallel_sizes=ParallelSizes(int(args.get("tp_size") or 1), int(args.get("pp_size") or 1),
                                     int(args.get("dp_size") or 1)),
        max_model_len=args.get("context_length"),
        weight_version=version_number(model_info.get("weight_version")), same_host=same_host,
        extra={"tp_size": int(args.get("tp_size") or 1), "cpu": cpu})


def _get_either(http: ServerHTTP, path: str, older: str) -> ServerAnswer:
    answer = http.request_sync("GET", path)
    return http.request_sync("GET", older) if answer.status == 404 else answer


def _labels_tokens(args: Mapping[str, Any]) -> bool:
    """Whether the server's per-token version spans are exact: SGLang reports them from 0.5.23, and
    labels a token when its step's result is processed, so only without overlap scheduling (under
    overlap a step in flight when an update lands is labelled with the new version)."""
    from packaging.version import InvalidVersion, Version

    try:
        reports = Version(str(args.get("version"))).release >= (0, 5, 23)
    except InvalidVersion:
        return False
    return reports and bool(args.get("disable_overlap_schedule"))


def _served_dtype(args: Mapping[str, Any], model_path: str | None) -> str:
    """The dtype the server serves: its ``--dtype``, or for ``"auto"`` SGLang's own rule, which keeps
    the checkpoint's declared dtype except float32 (or none declared), served in float16, bfloat16 for
    Gemma models. A server started by ``launch.server_command`` always has an explicit dtype."""
    dtype = str(args.get("dtype") or "auto")
    if dtype != "auto" or not model_path:
        return {"half": "float16", "float": "float32"}.get(dtype, dtype)
    config = model_folder_json(model_path, "config.json")
    if config is None:
        return "bfloat16"  # the folder is on the server's machine: the usual dtype of a released checkpoint
    declared = declared_dtype(config)
    if declared == "float32":
        return "bfloat16" if str(config.get("model_type", "")).startswith("gemma") else "float16"
    return declared


def version_number(label: Any) -> int:
    text = str(label)
    return int(text) if text.isdigit() else 0


class Translation:
    """The facade's translation hook: canonical parameters -> SGLang's ``sampling_params`` JSON."""

    def __init__(self, max_logprobs: int = MAX_TOP_LOGPROBS) -> None:
        self.max_logprobs = max_logprobs

    def skyrl_backends_translate_sampling_params(self, params: SamplingParams, config: Any = None) -> dict[str, Any]:
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise SamplingParamsError.out_of_range("logprobs", params.logprobs, f"at most {self.max_logprobs}")
        sp: dict[str, Any] = {
            "max_new_tokens": params.max_generate_length, "min_new_tokens": params.min_new_tokens,
            "temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(params.top_k),
            "min_p": float(params.min_p), "ignore_eos": params.ignore_eos,
            "no_stop_trim": True,  # token-in mode: SGLang must never trim output around stops
        }
        if params.stop_token_ids and not params.ignore_eos:
            sp["stop_token_ids"] = sorted(set(params.stop_token_ids))  # ignore_eos disables them: watched here
        return sp


class SGLangServerEngine(ServerEngine):
    """The engine hooks over one SGLang server; see the module docstring."""

    def __init__(self, http: ServerHTTP, info: ServerInfo) -> None:
        super().__init__(http, info)
        self.text = ResponseText(info.model)
        # For EOS as the last allowed token, which SGLang 0.5.17 reports as "length" (known where the
        # model folder is readable here, as the text is).
        self.eos_token_ids = declared_eos_token_ids(info.model)
        self._pause_mode: str | None = None  # SGLang's: in_place, retract or abort
        self._group: str | None = None
        self._flush_when_idle = False
        self._sessions: bool | None = None  # whether the server brackets updates (None: not known yet)

    # -- generation --------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest, engine_params: dict[str, Any]) -> GenerateOutput:
        self.check_prompts(request.prompt_token_ids)

        async def one(prompt: list[int], rid: str) -> Completion:
            final: Completion | None = None
            async for chunk in self._sequence(0, prompt, rid, engine_params, request.sampling_params,
                                              request.lora_name, streamed=False):
                final = chunk.completion or final
            assert final is not None
            return final

        return GenerateOutput(list(await asyncio.gather(*(one(p, rid) for p, rid in
                                                          zip(request.prompt_token_ids, request.request_ids,
                                                              strict=True)))))

    @hookimpl
    async def skyrl_backends_generate_stream(self, request: GenerateRequest,
                                             engine_params: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        self.check_prompts(request.prompt_token_ids)
        chunks: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()

        async def one(index: int, prompt: list[int], rid: str) -> None:
            try:
                async for chunk in self._sequence(index, prompt, rid, engine_params, request.sampling_params,
                                                  request.lora_name, streamed=True):
                    chunks.put_nowait(chunk)
            except BaseException as error:
                chunks.put_nowait(error)
                raise

        tasks = [asyncio.ensure_future(one(i, p, rid))
                 for i, (p, rid) in enumerate(zip(request.prompt_token_ids, request.request_ids, strict=True))]
        try:
            finished = 0
            while finished < len(tasks):
                chunk = await chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                yield chunk
                finished += chunk.completion is not None
        finally:
            for task in tasks:
                task.cancel()

    def _body(self, prompt: list[int], rid: str, sp: dict[str, Any], params: SamplingParams, lora: str | None,
              stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"input_ids": list(prompt), "sampling_params": sp, "rid": rid, "stream": stream}
        if params.logprobs is not None:
            body["return_logprob"] = True
            body["top_logprobs_num"] = params.logprobs
        if lora is not None:
            body["lora_path"] = lora
        return body

    async def _sequence(self, index: int, prompt: list[int], rid: str, sp: dict[str, Any], params: SamplingParams,
                        lora: str | None, streamed: bool) -> AsyncIterator[StreamChunk]:
        """One sequence's chunks (the last carries the completion). Streamed from the server when the
        caller streams or this side must stop the sequence itself."""
        await self._updates.wait_idle()
        if self.take_abort(rid):
            yield StreamChunk.final(index, empty_aborted(rid, params.logprobs))
            return
        mark = self._updates.mark()
        watched = set(params.stop_token_ids) if params.ignore_eos else set()
        matcher = StopStringMatcher(params.stop, self.text.decode) if params.stop else None
        if matcher is not None and not self.text.available:
            raise UnsupportedCapabilityError(f"{PROTOCOL}-server", "stop_strings",
                                             f"SGLang in token-in mode cannot match stop strings, and the tokenizer "
                                             f"of {self.info.model} is not readable here to match them on this side.")
        stream = streamed or matcher is not None or bool(watched)
        tokens: list[int] = []
        meta: Mapping[str, Any] = {}
        sent = checked = 0  # tokens handed to the caller, and checked for a stop here
        stop: tuple[str, str | int] | None = None  # ("stop", reason) set here
        with self.in_flight(rid):
            body = self._body(prompt, rid, sp, params, lora, stream)
            if stream:
                async for event in self.http.events("/generate", body):
                    if isinstance(event, ServerAnswer):
                        raise _generation_error(event)
                    if "error" in event and "output_ids" not in event:
                        raise _generation_error(ServerAnswer(400, event))
                    tokens, meta = [int(t) for t in event.get("output_ids") or []], event.get("meta_info") or {}
                    end = _first_stop(matcher, watched, tokens, checked)
                    checked = len(tokens)
                    if end is not None:
                        tokens, stop = tokens[:end[0]], ("stop", end[1])
                        await self.abort_on_server([rid])  # the rest is not wanted
                        break
                    if (meta.get("finish_reason") is None and streamed and len(tokens) > sent
                            and self._updates.unchanged_since(mark)):
                        logprobs, top = _logprobs(meta, sent, len(tokens), params.logprobs)
                        yield StreamChunk(index, tokens[sent:], logprobs, top,
                                          token_versions=TokenVersions.uniform(len(tokens) - sent, mark.version))
                        sent = len(tokens)
                    await asyncio.sleep(0)  # a caller reacting to a token gets its turn
            else:
                answer = await self.http.request("POST", "/generate", json_body=body)
                if not answer.ok:
                    raise _generation_error(answer)
                tokens, meta = [int(t) for t in answer.body.get("output_ids") or []], answer.body.get("meta_info") or {}
        await self._flush_if_due()
        completion = self._completion(tokens, meta, stop, rid, params)
        completion.token_versions = _versions(meta, len(tokens), mark.version, self._updates.unchanged_since(mark))
        yield StreamChunk.final(index, completion, sent)

    def _completion(self, tokens: list[int], meta: Mapping[str, Any], stop: tuple[str, str | int] | None, rid: str,
                    params: SamplingParams) -> Completion:
        if stop is not None:
            finish, reason = stop
        else:
            info = meta.get("finish_reason") or {"type": "abort"}
            finish = info.get("type") if info.get("type") in _FINISH_REASONS else "abort"
            reason = info.get("matched") if finish == "stop" else None
            if finish == "stop" and reason is None and tokens:
                reason = tokens[-1]  # EOS
            finish, reason = stop_on_last_token(finish, tokens, reason, params, self.eos_token_ids)
        logprobs, top = _logprobs(meta, 0, len(tokens), params.logprobs)
        text = self.text.of(tokens, reason if isinstance(reason, str) else None)
        return Completion(token_ids=tokens, finish_reason=finish, logprobs=logprobs, top_logprobs=top,  # type: ignore[arg-type]
                          text=text, stop_reason=reason, request_id=rid)

    # -- abort and pause ------------------------------------------------------------------------------
    async def abort_on_server(self, request_ids: list[str] | None) -> None:
        bodies = [{"abort_all": True}] if request_ids is None else [{"rid": rid} for rid in request_ids]
        for body in bodies:
            await self._post("/abort_request", body)
        if self._pause_mode in ("in_place", "retract") and self._inflight:
            # A paused scheduler retires nothing: let it step until the aborted requests came back.
            await self._post("/continue_generation", {})
            try:
                await self._until_returned(set(self._inflight) if request_ids is None else set(request_ids))
            finally:
                await self._post("/pause_generation", {"mode": self._pause_mode})

    async def _until_returned(self, request_ids: set[str] | None) -> None:
        """Wait until none of ``request_ids`` (None: no request at all) is in flight here any more,
        looking every 2 ms, for at most ``_RETIRE_WAIT_S``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RETIRE_WAIT_S
        while (self._inflight if request_ids is None else request_ids & self._inflight) and loop.time() < deadline:
            await asyncio.sleep(0.002)

    @hookimpl
    async def skyrl_backends_pause_generation(self, mode: str, recompute: bool) -> None:
        sglang_mode = "abort" if mode == "abort" else ("retract" if recompute else "in_place")
        if sglang_mode == "abort" and self._inflight:
            # SGLang's abort pause aborts every request, then checks once a second whether any still
            # runs: under running requests it answers a second after they ended. Ours are aborted
            # and awaited first, at a 2 ms grain (others' requests on the server still cost it that).
            await self.abort_on_server(None)
            await self._until_returned(None)
        await self._post("/pause_generation", {"mode": sglang_mode})
        self._pause_mode = sglang_mode

    @hookimpl
    async def skyrl_backends_resume_generation(self) -> None:
        # No torch.cuda.empty_cache() on SGLang's CPU path (the field is 0.5.23's; older servers empty it anyway).
        await self._post("/continue_generation", {"torch_empty_cache": False} if self.info.extra.get("cpu") else {})
        self._pause_mode = None

    # -- memory ---------------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        await self._post("/flush_cache", params={"timeout": 10.0})  # SGLang releases only when idle
        await self._post("/release_memory_occupation", {"tags": _sglang_tags(tags)})

    @hookimpl
    async def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        await self._post("/resume_memory_occupation", {"tags": _sglang_tags(tags)})

    # -- weights --------------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        answer = await self.http.request("POST", "/init_weights_update_group", json_body={
            "master_address": init_info.master_addr, "master_port": init_info.master_port,
            "rank_offset": init_info.rank_offset, "world_size": init_info.world_size,
            "group_name": init_info.group_name, "backend": init_info.backend})
        if not answer.ok or not (answer.body or {}).get("success", False):
            raise EngineStateError(f"SGLang could not join the weight-sync group {init_info.group_name!r}: "
                                   f"{answer.message()}")
        self._group = init_info.group_name

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest, version: int) -> None:
        # Paused in place with requests in flight, SGLang cannot flush (it flushes only when idle):
        # the flush then follows once the last of them has returned.
        flush_now = not (self._pause_mode == "in_place" and self._inflight)
        body: dict[str, Any] = {"flush_cache": flush_now}
        if self.info.capabilities.token_versions:  # the label SGLang stamps on the tokens (0.5.23 on)
            body["weight_version"] = str(version)
        keep_alive: Any = None
        if request.strategy == "broadcast":
            if self._group is None:
                raise EngineStateError("broadcast weight sync needs init_weight_update_communicator() first.")
            path = "/update_weights_from_distributed"
            body.update(names=list(request.names), dtypes=list(request.dtypes),
                        shapes=[list(s) for s in request.shapes], group_name=self._group)
        elif request.strategy == "tensors":
            if not self.info.same_host and any(getattr(t, "is_cuda", False) for t in request.payload or []):
                raise UnsupportedCapabilityError(f"{PROTOCOL}-server", "CUDA tensors from another machine",
                                                 "They travel as CUDA IPC handles, which only the server's machine "
                                                 "opens: send CPU tensors, or broadcast (connect_broadcast).")
            path = "/update_weights_from_tensor"
            serialized, keep_alive = _serialized(list(zip(request.names, request.payload or [], strict=True)))
            body["serialized_named_tensors"] = [serialized] * int(self.info.extra.get("tp_size", 1))
        else:
            raise UnsupportedCapabilityError(f"{PROTOCOL}-server", f"weight sync by {request.strategy!r}",
                                             "SGLang's server receives broadcasts and, on its machine, tensors.")
        async with self._updates.updating(version):
            async with self._update_session():
                answer = await self.http.request("POST", path, json_body=body)
            if not answer.ok or not (answer.body or {}).get("success", False):
                raise WeightUpdateError({"request": f"SGLang refused the update (HTTP {answer.status}): "
                                                    f"{answer.message()}"})
        del keep_alive  # the shared tensors were mapped and loaded: their memory may go
        self._flush_when_idle = self._flush_when_idle or not flush_now

    @contextlib.asynccontextmanager
    async def _update_session(self) -> AsyncIterator[None]:
        """SGLang 0.5.23 loads weights only between ``/begin_weight_update`` and
        ``/end_weight_update``; releases without those routes (0.5.17) load them any time."""
        if self._sessions is False:
            yield
            return
        begun = await self.http.request("POST", "/begin_weight_update", json_body={})
        if begun.status == 404:
            self._sessions = False
            yield
            return
        if not begun.ok or not (begun.body or {}).get("success", False):
            raise EngineStateError(f"SGLang could not begin a weight update: {begun.message()}")
        self._sessions = True
        try:
            yield
        finally:
            ended = await self.http.request("POST", "/end_weight_update", json_body={})
            if not ended.ok or not (ended.body or {}).get("success", False):
                raise EngineStateError(f"SGLang could not end the weight update: {ended.message()}")

    async def _flush_if_due(self) -> None:
        if self._flush_when_idle and not self._inflight:
            self._flush_when_idle = False
            await self.http.request("POST", "/flush_cache")

    # -- LoRA, caches ---------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> None:
        answer = await self.http.request("POST", "/load_lora_adapter",
                                         json_body={"lora_name": lora_name, "lora_path": lora_path, "pinned": pinned})
        if not answer.ok or not (answer.body or {}).get("success", True):
            raise LoraAdapterError(f"SGLang could not load LoRA adapter {lora_name!r} from {lora_path}: "
                                   f"{answer.message()}")

    @hookimpl
    async def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        answer = await self.http.request("POST", "/unload_lora_adapter", json_body={"lora_name": lora_name})
        if not answer.ok or not (answer.body or {}).get("success", True):
            raise LoraAdapterError(f"SGLang could not unload LoRA adapter {lora_name!r}: {answer.message()}")

    @hookimpl
    async def skyrl_backends_reset_prefix_cache(self) -> None:
        await self._post("/flush_cache", params={"timeout": 10.0})

    async def _post(self, path: str, body: Any = None, params: Any = None) -> Any:
        answer = await self.http.request("POST", path, json_body=body, params=params)
        if not answer.ok:
            raise EngineStateError(f"SGLang at {self.http.base_url}{path} answered HTTP {answer.status}: "
                                   f"{answer.message()}")
        return answer.body


def _first_stop(matcher: StopStringMatcher | None, watched: set[int], tokens: list[int],
                checked: int) -> tuple[int, str | int] | None:
    """The first token after ``checked`` that ends the sequence here: ``(tokens up to and including
    it, the stop string or id)``."""
    for end in range(checked + 1, len(tokens) + 1):
        if tokens[end - 1] in watched:
            return end, tokens[end - 1]
        if matcher is not None:
            match = matcher.feed(tokens[:end])
            if match is not None:
                return end, match[0]
    return None


def _logprobs(meta: Mapping[str, Any], start: int, end: int,
              top_n: int | None) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    if top_n is None:
        return None, None
    chosen_entries = list(meta.get("output_token_logprobs") or [])[start:end]
    if len(chosen_entries) != end - start:
        raise EngineStateError(f"SGLang returned {len(chosen_entries)} log-probabilities for {end - start} tokens")
    chosen = [float(entry[0]) for entry in chosen_entries]
    if not top_n:
        return chosen, None
    tops = list(meta.get("output_top_logprobs") or [])[start:end]
    return chosen, [{int(c[1]): float(c[0]) for c in (step or [])[:top_n]} for step in tops]


def _versions(meta: Mapping[str, Any], count: int, started: int, unchanged: bool) -> TokenVersions | None:
    spans = meta.get("weight_versions")
    if spans:
        per_token: list[int] = []
        for span in spans:
            per_token.extend([version_number(span.get("version"))] * (int(span["end"]) - int(span["start"])))
        if len(per_token) >= count:
            return TokenVersions.from_per_token(per_token[:count])
    return TokenVersions.uniform(count, started) if unchanged else None


def _generation_error(answer: ServerAnswer) -> Exception:
    message = f"SGLang at /generate answered HTTP {answer.status}: {answer.message()}"
    if answer.status == 400:
        return ConfigError("prompt_token_ids", message)
    return EngineStateError(message)


def _sglang_tags(tags: Sequence[str]) -> list[str]:
    # CUDA graphs go with the weights they run, as the sglang backend releases them.
    out: list[str] = []
    for tag in tags:
        out += ["weights", "cuda_graph"] if tag == "weights" else [tag]
    return out


def _serialized(named: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """``named`` as SGLang's ``MultiprocessingSerializer`` reads it (a pickle, base64). CUDA tensors
    travel as CUDA IPC handles (torch's ForkingPickler: the server must be on this machine's GPUs); CPU
    tensors by value, inside the pickle (torch's own storage format, which SGLang's restricted
    unpickler accepts), since the alternatives need a process that shares this one's lineage (file
    descriptors) or leave a torch shared-memory manager behind (named segments). Returns the text and
    the tensors it refers to, which must live until the server has loaded them."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    tensors = [(name, tensor.detach().contiguous()) for name, tensor in named]
    buffer = io.BytesIO()
    if any(getattr(t, "is_cuda", False) for _, t in tensors):
        ForkingPickler(buffer).dump(tensors)
    else:
        pickle.dump(tensors, buffer)
    return base64.b64encode(buffer.getvalue()).decode(), tensors


ENGINE = SGLangServerEngine

__all__ = ["ENGINE", "PROTOCOL", "SGLangServerEngine", "Translation", "describe", "version_number"]
