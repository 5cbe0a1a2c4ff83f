"""An engine behind an unmodified ``vllm serve``: the engine hooks over vLLM's own HTTP API (0.32).

The server must be started with what the engine contract needs (:func:`server_flags` lists it;
:func:`describe` names whatever is missing, with the flag that adds it):

* ``VLLM_SERVER_DEV_MODE=1`` in its environment: vLLM's RL routes (``/pause``, ``/resume``,
  ``/sleep``, ``/wake_up``, the weight transfer in phases, ``/abort_requests``) and ``/server_info``;
* ``--enable-scale-out``: ``POST /inference/v1/generate``, token ids in and out, with integer-keyed
  log-probabilities and each token's weight version (``weight_versions`` spans);
* ``--logprobs-mode raw_logprobs``: log-probabilities of the raw model, as the engine API defines them;
* ``--weight-transfer-config '{"backend": "skyrl"}'`` for weight updates, with the vLLM backend
  installed on the server (its ``vllm.general_plugins`` entry point registers the ``"skyrl"``
  weight-transfer engine: shared memory and CUDA IPC on the server's machine, gloo or NCCL broadcast
  from anywhere). vLLM's own ``nccl`` and ``ipc`` backends are not spoken here.

How each hook is spoken:

========================================  ==============================================================
hook                                      vLLM route
========================================  ==============================================================
generate, generate_stream                 ``POST /inference/v1/generate`` per sequence (``stream`` for
                                          streaming), ``request_id`` the engine's, ``cache_salt`` the
                                          weights' version, ``model`` the LoRA adapter
abort                                     ``POST /abort_requests`` (vLLM prefixes a generate's id with
                                          ``generate-tokens-``)
pause_generation (keep, abort) / resume   ``POST /pause?mode=keep|abort&clear_cache=<recompute>``,
                                          ``POST /resume`` (``wait`` is the facade's)
sleep / wake_up                           ``POST /sleep?level=N&mode=abort``, ``POST /wake_up?tags=...``
init_weight_update_communicator           ``POST /init_weight_transfer_engine`` (``"skyrl"`` payloads)
update_named_weights                      ``/pause?mode=keep`` (unless paused), ``/start_weight_update``,
                                          ``/update_weights``, ``/finish_weight_update`` with the
                                          facade's version as vLLM's label, ``/resume``
load / unload_lora_adapter                ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``
                                          (server started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``)
reset_prefix_cache                        ``POST /reset_prefix_cache?reset_running_requests=true``
========================================  ==============================================================
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from skyrl_backends.capabilities import Capabilities
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
from skyrl_backends.stopping import StopStringMatcher
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
from skyrl_backends.weight_sync.manifest import weight_update_error_from_text
from skyrl_backends.weight_sync.phases import BACKEND as SKYRL_TRANSFER
from skyrl_backends.weight_sync.phases import init_info_to_json, update_info_to_json

PROTOCOL = "vllm"
GENERATE = "/inference/v1/generate"
# vLLM's prefix of the engine request id of a /inference/v1/generate request.
GENERATE_ID_PREFIX = "generate-tokens-"
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_FINISH_REASONS = ("stop", "length", "abort")


def server_flags(weight_transfer: bool = True) -> tuple[dict[str, str], list[str]]:
    """The environment and arguments ``vllm serve`` needs to be driven here (beyond the model)."""
    env = {DEV_MODE_ENV: "1"}
    args = ["--enable-scale-out", "--logprobs-mode", "raw_logprobs"]
    if weight_transfer:
        args += ["--weight-transfer-config", json.dumps({"backend": SKYRL_TRANSFER})]
    return env, args


# -- connecting ---------------------------------------------------------------------------------------
def describe(http: ServerHTTP, wait_ready_s: float, same_host: bool) -> ServerInfo:
    """What the server at ``http`` serves and can do, from ``/server_info`` (checked against what
    the engine contract needs)."""
    http.wait_ready("/health", wait_ready_s)
    answer = http.request_sync("GET", "/server_info", params={"config_format": "json"})
    if answer.status == 404:
        raise ConfigError("remote_inference_engine_urls",
                          f"{http.base_url} does not serve vLLM's /server_info: start `vllm serve` with "
                          f"{DEV_MODE_ENV}=1 in its environment (its RL routes: pause, weight transfer, sleep)")
    if not answer.ok or not isinstance(answer.body, Mapping):
        raise ConfigError("remote_inference_engine_urls", f"{http.base_url}/server_info answered "
                                                          f"HTTP {answer.status}: {answer.message()}")
    config = answer.body.get("vllm_config")
    config = json.loads(config) if isinstance(config, str) else config
    env = answer.body.get("vllm_env") or {}
    model = config.get("model_config") or {}
    if model.get("logprobs_mode") != "raw_logprobs":
        raise ConfigError("remote_inference_engine_urls",
                          f"{http.base_url} returns {model.get('logprobs_mode')!r} log-probabilities; the engine API's "
                          f"are the raw model's: start `vllm serve` with --logprobs-mode raw_logprobs")
    probe = http.request_sync("POST", GENERATE, json_body={"token_ids": [0], "sampling_params": {"max_tokens": 1}})
    if not probe.ok:
        raise ConfigError("remote_inference_engine_urls",
                          f"{http.base_url}{GENERATE} answered HTTP {probe.status} ({probe.message()}): start "
                          f"`vllm serve` with --enable-scale-out (token ids in and out)")
    version = http.request_sync("GET", "/version")
    weight_label = http.request_sync("GET", "/weight_info")
    device = str((config.get("device_config") or {}).get("device", "cpu"))
    transfer = (config.get("weight_transfer_config") or {}).get("backend")
    parallel = config.get("parallel_config") or {}
    capabilities = _capabilities(model, config, env, device, transfer, same_host)
    return ServerInfo(
        protocol=PROTOCOL, url=http.base_url, model=model.get("model"),
        served_dtype=str(model.get("dtype", "auto")).removeprefix("torch."),
        engine_version=(version.body or {}).get("version") if version.ok else None,
        capabilities=capabilities,
        parallel_sizes=ParallelSizes(int(parallel.get("tensor_parallel_size", 1)),
                                     int(parallel.get("pipeline_parallel_size", 1)),
                                     int(parallel.get("data_parallel_size", 1))),
        max_model_len=model.get("max_model_len"),
        weight_version=version_number((weight_label.body or {}).get("weight_version")) if weight_label.ok else 0,
        same_host=same_host,
        extra={"weight_transfer_backend": transfer, "device": device,
               "served_model_name": model.get("served_model_name")},
    )


def _capabilities(model: Mapping[str, Any], config: Mapping[str, Any], env: Mapping[str, Any], device: str,
                  transfer: str | None, same_host: bool) -> Capabilities:
    # vLLM on CPU answers /sleep and frees nothing: no sleep is declared there (as the vLLM backend does).
    sleeps = device != "cpu" and bool(model.get("enable_sleep_mode"))
    strategies: list[str] = []
    if transfer == SKYRL_TRANSFER:
        if same_host:
            strategies += ["tensors", "shared_memory"] + (["cuda_ipc"] if device == "cuda" else [])
        strategies.append("broadcast")
    runtime_lora = str(env.get(LORA_ENV, "")).lower() in ("1", "true")
    return Capabilities(
        sleep_levels=(1, 2) if sleeps else (),
        discards_weights_at_level=2 if sleeps else None,
        sleep_tags=False,
        # The server's engine core clears its caches, prefix cache included, when it sleeps at
        # level 1 or 2 (EngineCore.sleep in vLLM 0.26 and 0.32).
        sleep_clears_prefix_cache=sleeps,
        lora=config.get("lora_config") is not None and runtime_lora,
        top_logprobs=True,
        max_top_logprobs=int(model.get("max_logprobs", 20)) - 1,  # one is asked for on top (Translation)
        stop_strings=True,
        min_new_tokens=True,
        seeded_sampling=True,
        min_p=True,
        repetition_penalty=True,
        prefix_caching=bool((config.get("cache_config") or {}).get("enable_prefix_caching")),
        abort=True,
        native_pause=True,
        # vLLM's wait finishes only the requests already running; the facade's wait lets every
        # admitted request finish.
        pause_modes=("abort",),
        recompute_on_resume=True,
        token_versions=True,
        weight_sync_strategies=tuple(strategies),
        streaming=True,
    )


def version_number(label: Any) -> int:
    """vLLM's weight-version label as the facade's version number (``"default"``: the weights the
    server started with, 0)."""
    text = str(label)
    return int(text) if text.isdigit() else 0


# -- sampling ------------------------------------------------------------------------------------------
class Translation:
    """The facade's translation hook: canonical parameters -> the JSON of vLLM's ``SamplingParams``."""

    def __init__(self, max_logprobs: int) -> None:
        self.max_logprobs = max_logprobs

    def skyrl_backends_translate_sampling_params(self, params: SamplingParams, config: Any = None) -> dict[str, Any]:
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise SamplingParamsError.out_of_range(
                "logprobs", params.logprobs, f"at most {self.max_logprobs} (one below the server's --max-logprobs)")
        body: dict[str, Any] = {
            "n": 1, "max_tokens": params.max_generate_length, "min_tokens": params.min_new_tokens,
            "temperature": float(params.temperature), "top_p": float(params.top_p),
            "top_k": 0 if params.top_k == -1 else params.top_k, "min_p": float(params.min_p),
            "repetition_penalty": float(params.repetition_penalty),
            # vLLM's route lists the sampled token first and cuts the list at N entries, losing the N-th
            # candidate when the sampled token is not among the top N: one more is asked for, and the
            # top N by rank kept (_logprobs).
            "logprobs": params.logprobs + 1 if params.logprobs else params.logprobs,
            "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos, "seed": params.seed,
            "skip_special_tokens": True,
            # Stop strings need vLLM's detokenizer; the response text is decoded here.
            "detokenize": bool(params.stop),
        }
        if params.stop:
            body["stop"] = list(params.stop)
            body["include_stop_str_in_output"] = True
        return body


# -- the engine ----------------------------------------------------------------------------------------
class VLLMServerEngine(ServerEngine):
    """The engine hooks over one ``vllm serve``; see the module docstring."""

    def __init__(self, http: ServerHTTP, info: ServerInfo) -> None:
        super().__init__(http, info)
        self.text = ResponseText(info.model)
        self._paused = False

    # -- generation --------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest, engine_params: dict[str, Any]) -> GenerateOutput:
        params = request.sampling_params
        self.check_prompts(request.prompt_token_ids)
        completions = await asyncio.gather(*(
            self._generate_one(prompt, rid, engine_params, params, request.lora_name)
            for prompt, rid in zip(request.prompt_token_ids, request.request_ids, strict=True)))
        return GenerateOutput(list(completions))

    def _body(self, prompt: list[int], request_id: str, engine_params: dict[str, Any], lora_name: str | None,
              stream: bool) -> dict[str, Any]:
        body = {"request_id": request_id, "token_ids": list(prompt), "sampling_params": engine_params,
                "cache_salt": self.cache_salt(), "stream": stream}
        if lora_name is not None:
            body["model"] = lora_name
        return body

    def matches_stop_here(self, prompt: list[int], params: SamplingParams) -> bool:
        """Whether stop strings are matched on this side: where vLLM's own matching is not the
        engine API's rule (a prompt whose text ends mid-character, which vLLM matches against; a
        ``min_new_tokens``, until which vLLM defers stop strings) and a tokenizer is at hand."""
        return bool(params.stop) and (params.min_new_tokens > 0 or self.text.ends_mid_character(prompt))

    async def _generate_one(self, prompt: list[int], request_id: str, engine_params: dict[str, Any],
                            params: SamplingParams, lora_name: str | None) -> Completion:
        if self.matches_stop_here(prompt, params):
            final: Completion | None = None
            async for chunk in self._stream_one(0, prompt, request_id, engine_params, params, lora_name):
                final = chunk.completion or final
            assert final is not None
            return final
        await self._updates.wait_idle()  # submitted on settled weights, under their cache salt
        if self.take_abort(request_id):
            return empty_aborted(request_id, params.logprobs)
        mark = self._updates.mark()
        with self.in_flight(request_id):
            answer = await self.http.request("POST", GENERATE,
                                             json_body=self._body(prompt, request_id, engine_params, lora_name, False))
        if not answer.ok:
            raise _generation_error(answer)
        choice = answer.body["choices"][0]
        completion = self._completion(choice, request_id, params)
        completion.token_versions = _versions(choice, len(completion.token_ids), mark.version,
                                              self._updates.unchanged_since(mark))
        return completion

    def _completion(self, choice: Mapping[str, Any], request_id: str, params: SamplingParams) -> Completion:
        tokens = [int(t) for t in choice.get("token_ids") or []]
        finish = choice.get("finish_reason")
        finish = finish if finish in _FINISH_REASONS else "abort"
        logprobs, top = _logprobs(tokens, choice.get("logprobs"), params.logprobs)
        stop_reason = choice.get("stop_reason") if finish == "stop" else None
        text = self.text.of(tokens, stop_reason if isinstance(stop_reason, str) else None)
        return Completion(token_ids=tokens, finish_reason=finish, logprobs=logprobs, top_logprobs=top, text=text,
                          stop_reason=stop_reason, request_id=request_id)

    @hookimpl
    async def skyrl_backends_generate_stream(self, request: GenerateRequest,
                                             engine_params: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        params = request.sampling_params
        self.check_prompts(request.prompt_token_ids)
        chunks: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()

        async def one(index: int, prompt: list[int], request_id: str) -> None:
            try:
                async for chunk in self._stream_one(index, prompt, request_id, engine_params, params,
                                                    request.lora_name):
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
                task.cancel()  # an early close: the server aborts a request whose client left

    async def _stream_one(self, index: int, prompt: list[int], request_id: str, engine_params: dict[str, Any],
                          params: SamplingParams, lora_name: str | None) -> AsyncIterator[StreamChunk]:
        await self._updates.wait_idle()
        if self.take_abort(request_id):
            yield StreamChunk.final(index, empty_aborted(request_id, params.logprobs))
            return
        mark = self._updates.mark()
        tokens: list[int] = []
        logprob_entries: list[Any] = []
        sent = 0
        final: Mapping[str, Any] | None = None
        matcher = None
        if self.matches_stop_here(prompt, params):
            matcher = StopStringMatcher(params.stop, self.text.decode)
            engine_params = {k: v for k, v in engine_params.items() if k not in ("stop", "include_stop_str_in_output")}
            engine_params["detokenize"] = False
        with self.in_flight(request_id):
            async for event in self.http.events(GENERATE, self._body(prompt, request_id, engine_params, lora_name,
                                                                    True)):
                if isinstance(event, ServerAnswer):
                    raise _generation_error(event)
                if "error" in event and "choices" not in event:
                    raise _generation_error(ServerAnswer(int((event["error"] or {}).get("code", 500)), event))
                choice = event["choices"][0]
                new = [int(t) for t in choice.get("token_ids") or []]
                tokens.extend(new)
                logprob_entries.extend(((choice.get("logprobs") or {}).get("content")) or [])
                stopped = _first_stop(matcher, tokens, len(new)) if matcher is not None else None
                if stopped is not None:  # the rest of the request is not wanted: leaving ends it
                    end, stop_reason = stopped
                    del tokens[end:], logprob_entries[end:]
                    final = {"finish_reason": "stop", "stop_reason": stop_reason}
                    break
                if choice.get("finish_reason") is not None:
                    final = choice
                    break
                # Tokens are handed out while no update has begun under the request (their version is
                # the one it started under); after that they wait for the final spans. Tokens a stop
                # string could still take back are not held: vLLM sends only what it keeps.
                if new and self._updates.unchanged_since(mark):
                    logprobs, top = _logprobs(tokens[sent:], {"content": logprob_entries[sent:]}, params.logprobs)
                    yield StreamChunk(index, tokens[sent:], logprobs, top,
                                      token_versions=TokenVersions.uniform(len(tokens) - sent, mark.version))
                    sent = len(tokens)
                # Events that arrived together are read without suspending; a caller reacting to a
                # token (a pause, an abort) gets its turn after each one.
                await asyncio.sleep(0)
        whole = dict(final or {"finish_reason": "abort"})
        whole["token_ids"], whole["logprobs"] = tokens, {"content": logprob_entries}
        completion = self._completion(whole, request_id, params)
        completion.token_versions = _versions(final or {}, len(tokens), mark.version,
                                              self._updates.unchanged_since(mark))
        yield StreamChunk.final(index, completion, sent)

    async def abort_on_server(self, request_ids: list[str] | None) -> None:
        body = {} if request_ids is None else {"request_ids": [GENERATE_ID_PREFIX + rid for rid in request_ids]}
        answer = await self.http.request("POST", "/abort_requests", json_body=body)
        if not answer.ok:
            raise EngineStateError(f"{self.http.base_url}/abort_requests answered HTTP {answer.status}: "
                                   f"{answer.message()}")

    # -- pausing ------------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_pause_generation(self, mode: str, recompute: bool) -> None:
        # keep: vLLM freezes requests with their caches; clear_cache preempts them, so they are
        # prefilled again on resume under the weights current then. abort: vLLM ends every request.
        await self._post("/pause", params={"mode": mode, "clear_cache": _flag(recompute)})
        self._paused = True

    @hookimpl
    async def skyrl_backends_resume_generation(self) -> None:
        await self._post("/resume")
        self._paused = False

    # -- memory -------------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        await self._post("/sleep", params={"level": level, "mode": "abort"})

    @hookimpl
    async def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        await self._post("/wake_up", params=[("tags", tag) for tag in tags])
        # vLLM resumes its scheduler once every tag is awake, also after a /pause: pause again.
        if self._paused and not await self._asleep():
            await self._post("/pause", params={"mode": "keep", "clear_cache": "false"})

    async def _asleep(self) -> bool:
        answer = await self.http.request("GET", "/is_sleeping")
        return bool(answer.ok and (answer.body or {}).get("is_sleeping"))

    # -- weights ------------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_init_weight_update_communicator(self, init_info: WeightSyncInitInfo) -> None:
        self._check_transfer()
        await self._post("/init_weight_transfer_engine", json_body={"init_info": init_info_to_json(init_info)},
                         weights=True)

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest, version: int) -> None:
        self._check_transfer()
        transported = self.transported(request)
        # Applied with generation paused (unless the trainer paused it), so no step runs between the
        # new weights and their label: vLLM's per-token labels stay exact.
        pause_here = not self._paused
        async with self._updates.updating(version):
            if pause_here:
                await self._post("/pause", params={"mode": "keep", "clear_cache": "false"})
            try:
                await self._post("/start_weight_update", weights=True)
                try:
                    await self._post("/update_weights", json_body={"update_info": update_info_to_json(transported)},
                                     weights=True)
                except BaseException:
                    # vLLM's workers end an update whose chunk failed; one that failed before reaching
                    # them is still open: close it (a second finish fails, quietly here).
                    try:
                        await self._post("/finish_weight_update", weights=True)
                    except Exception:
                        pass
                    raise
                await self._post("/finish_weight_update", json_body={"weight_version": str(version)}, weights=True)
            finally:
                if pause_here:
                    await self._post("/resume")

    def _check_transfer(self) -> None:
        if self.info.extra.get("weight_transfer_backend") != SKYRL_TRANSFER:
            raise UnsupportedCapabilityError(
                self.info.protocol + "-server", "weight transfer",
                f"The server at {self.info.url} was started with weight_transfer_config "
                f"{self.info.extra.get('weight_transfer_backend')!r}; start it with --weight-transfer-config "
                f"'{{\"backend\": \"{SKYRL_TRANSFER}\"}}' (the vLLM backend installed on the server registers it).")

    # -- LoRA, caches -------------------------------------------------------------------------------
    @hookimpl
    async def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> None:
        answer = await self.http.request("POST", "/v1/load_lora_adapter",
                                         json_body={"lora_name": lora_name, "lora_path": lora_path})
        if not answer.ok:
            raise LoraAdapterError(f"vLLM could not load LoRA adapter {lora_name!r} from {lora_path}: "
                                   f"{answer.message()}")

    @hookimpl
    async def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        answer = await self.http.request("POST", "/v1/unload_lora_adapter", json_body={"lora_name": lora_name})
        if not answer.ok:
            raise LoraAdapterError(f"vLLM could not unload LoRA adapter {lora_name!r}: {answer.message()}")

    @hookimpl
    async def skyrl_backends_reset_prefix_cache(self) -> None:
        await self._post("/reset_prefix_cache", params={"reset_running_requests": "true"})

    # -- calls ----------------------------------------------------------------------------------------
    async def _post(self, path: str, *, params: Any = None, json_body: Any = None, weights: bool = False) -> Any:
        answer = await self.http.request("POST", path, params=params, json_body=json_body)
        if answer.ok:
            return answer.body
        message = answer.message()
        if weights:
            # The worker's WeightUpdateError crosses vLLM's collective_rpc as text: rebuilt with its
            # offending tensors.
            recovered = weight_update_error_from_text(message)
            if recovered is not None:
                raise recovered
            if answer.status == 400:
                raise WeightUpdateError({"request": message})
        raise EngineStateError(f"vLLM at {self.http.base_url}{path} answered HTTP {answer.status}: {message}")


def _first_stop(matcher: StopStringMatcher, tokens: list[int], added: int) -> tuple[int, str] | None:
    """The first of the ``added`` last tokens that completes a stop string: ``(number of tokens up
    to and including it, the stop string)``."""
    for end in range(len(tokens) - added + 1, len(tokens) + 1):
        match = matcher.feed(tokens[:end])
        if match is not None:
            return end, match[0]
    return None


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _generation_error(answer: ServerAnswer) -> Exception:
    message = f"vLLM at {GENERATE} answered HTTP {answer.status}: {answer.message()}"
    if answer.status == 400:
        return ConfigError("prompt_token_ids", message)
    if answer.status == 404:
        return LoraAdapterError(message)
    return EngineStateError(message)


def _logprobs(tokens: Sequence[int], logprobs: Any, top_n: int | None) -> tuple[list[float] | None,
                                                                                list[dict[int, float]] | None]:
    """``(chosen token logprobs, top-N dicts)`` from vLLM's ``logprobs.content`` (one entry per token:
    the sampled token's logprob and rank, and the candidates with their ranks)."""
    if top_n is None:
        return None, None
    content = list((logprobs or {}).get("content") or [])
    if len(content) != len(tokens):
        raise EngineStateError(f"vLLM returned {len(content)} log-probabilities for {len(tokens)} tokens")
    chosen = [float(entry["logprob"]) for entry in content]
    if not top_n:
        return chosen, None
    top = [{int(c["token_id"]): float(c["logprob"]) for c in entry.get("top_logprobs") or []
            if c.get("rank") is not None and int(c["rank"]) <= top_n} for entry in content]
    return chosen, top


def _versions(choice: Mapping[str, Any], count: int, started: int, unchanged: bool) -> TokenVersions | None:
    """The versions of a completion's tokens: vLLM's spans (labels are the facade's version numbers),
    or, when no update began while it ran, the version it started under."""
    spans = choice.get("weight_versions")
    if spans:
        per_token: list[int] = []
        for span in spans:
            per_token.extend([version_number(span.get("version"))] * (int(span["end"]) - int(span["start"])))
        if len(per_token) >= count:
            return TokenVersions.from_per_token(per_token[:count])
    return TokenVersions.uniform(count, started) if unchanged else None


ENGINE = VLLMServerEngine

__all__ = ["ENGINE", "PROTOCOL", "Translation", "VLLMServerEngine", "describe", "server_flags", "version_number"]
