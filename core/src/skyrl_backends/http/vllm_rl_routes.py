"""vLLM's RL API on ``skyrl-backends serve``, over any backend.

The routes, payloads and status codes of ``vllm serve`` with ``VLLM_SERVER_DEV_MODE=1`` (vLLM 0.32:
``vllm/entrypoints/rl/online/api_router.py`` and the dev routers of ``vllm/entrypoints/serve/dev``),
plus its runtime LoRA routes and ``/server_info``, mapped onto the engine API of the client behind
the server. A trainer written for vLLM's server (vLLM's ``HTTPVLLMWeightSyncClient`` and trainer-side
engines, TRL's asynchronous GRPO) then drives transformers or SGLang engines unchanged.

* Weight transfer: ``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
  ``/finish_weight_update``, ``/shutdown_weight_transfer_engine``, ``/update_weight_version``,
  ``/weight_info``, ``/get_world_size``, with the weight-transfer backend the server was started with
  (``--weight-transfer-config '{"backend": "skyrl"}'``; see :mod:`skyrl_backends.weight_sync.phases`).
* Pausing: ``/pause?mode=abort|wait|keep``, ``/resume``, ``/is_paused``, ``/abort_requests``.
* Memory and caches: ``/sleep?level=0|1|2&mode=...``, ``/wake_up?tags=...``, ``/is_sleeping``,
  ``/release_kv_cache_memory``, ``/reset_prefix_cache``, ``/reset_mm_cache``, ``/reset_encoder_cache``.
* ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/server_info``.

Errors have vLLM's body, ``{"error": {"message", "type", "param", "code"}}`` with the status as
``code``, and vLLM's status, as ``vllm serve`` answers (checked against it by
``tests/native_protocols``): a malformed body or query (a field missing or of the wrong type) 400
(``Bad Request``, ``param`` naming it); in the weight transfer, every failure of the phases (a bad
init_info, an update the engines refuse, a call out of sequence, weight transfer not configured) 500
(``InternalServerError``), since vLLM's workers raise them through ``collective_rpc``; elsewhere a
``ValueError`` 400 (``BadRequestError``), a ``NotImplementedError`` (what a backend cannot do) 501
(``NotImplementedError``), anything else 500. ``/pause`` and ``/resume`` answer ``{"error": "..."}``
as vLLM's do.
What no backend here can do answers 501: ``/weight_checker``, ``/collective_rpc``,
``/start_draft_weight_update`` (500, as vLLM without a draft model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from skyrl_backends.errors import EngineStateError, UnsupportedCapabilityError
from skyrl_backends.http.engine_info import engine_states
from skyrl_backends.weight_sync.phases import PhasedWeightTransfer, world_size

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "wait", "keep")
# vLLM's wake-up tags: the engines' memory tags, and "scheduling" (the pause of a level-0 sleep).
SCHEDULING_TAG = "scheduling"


@dataclass
class VLLMRLOptions:
    """What the routes need besides the client: the served model's name and folder, the engines'
    dtype (``/server_info``; TRL reads the dtype there), and the weight-transfer backend (None: not
    configured, as ``vllm serve`` without ``--weight-transfer-config``)."""

    model_name: str
    model_path: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    weight_transfer_backend: str | None = None


# -- errors as vLLM writes them ------------------------------------------------------------------
class VLLMHTTPError(Exception):
    """An error answered with vLLM's body (what vLLM's route or FastAPI validation would answer)."""

    def __init__(self, status: int, message: str, *, type: str = "Bad Request",  # noqa: A002
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def response(self) -> JSONResponse:
        return vllm_error(self.status, self.message, self.type, self.param)


def vllm_error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:  # noqa: A002
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": status}},
                        status_code=status)


def error_response(exc: BaseException) -> JSONResponse:
    """vLLM's answer to ``exc`` (its ``create_error_response``): ValueError/TypeError 400,
    NotImplementedError 501, anything else 500."""
    if isinstance(exc, VLLMHTTPError):
        return exc.response()
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return vllm_error(400, str(exc), "BadRequestError", getattr(exc, "field", None))
    if isinstance(exc, NotImplementedError):
        return vllm_error(501, str(exc), "NotImplementedError")
    return internal_error(exc)


def internal_error(exc: BaseException) -> JSONResponse:
    """vLLM's 500: what its engine raised from its workers, whatever the exception (``collective_rpc``
    re-raises a worker's error as a RuntimeError), or from an unexpected failure."""
    if isinstance(exc, VLLMHTTPError):
        return exc.response()
    if not isinstance(exc, (EngineStateError, ValueError, NotImplementedError)):
        logger.exception("vLLM RL route failed", exc_info=exc)
    return vllm_error(500, str(exc) or type(exc).__name__, "InternalServerError")


async def _json_body(request: Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise VLLMHTTPError(400, "The request body must be a JSON object.", param="body")
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VLLMHTTPError(400, f"JSON decode error: {exc}", param="body") from None
    if not isinstance(body, dict):
        raise VLLMHTTPError(400, "Request body must be a JSON object", param="body")
    return body


def _field(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], *, required: bool) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise VLLMHTTPError(400, f"Field required: {name}", param=f"body.{name}")
        return None
    value = body[name]
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        expected = " or ".join(k.__name__ for k in kinds)
        raise VLLMHTTPError(400, f"Input should be a valid {expected}: {name}", param=f"body.{name}")
    return value


def _query_bool(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise VLLMHTTPError(400, f"Input should be a valid boolean: {name}", param=f"query.{name}")


def _query_mode(request: Request) -> str:
    mode = request.query_params.get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise VLLMHTTPError(400, "Input should be 'abort', 'wait' or 'keep'", param="query.mode")
    return mode


# -- pausing ---------------------------------------------------------------------------------------
async def pause(client: Any, mode: str, clear_cache: bool = True) -> None:
    """Pause ``client`` as vLLM's ``/pause?mode=...&clear_cache=...`` pauses its engine, with the
    client's own pause modes (:meth:`InferenceEngineClient.pause_generation`): new requests wait
    until resume in every mode; ``abort`` ends in-flight requests now (finish reason ``abort``),
    ``wait`` lets them finish first, ``keep`` keeps them.

    ``clear_cache`` is vLLM's: with ``keep``, vLLM preempts the kept requests and prefills them again
    on resume, so here it asks for ``recompute`` (kept requests continue on the weights current at
    resume, their caches recomputed); with ``abort`` and ``wait`` the prefix caches are reset once
    the engines are idle. Pausing a client already paused in another mode is refused (vLLM answers
    such a ValueError with 400)."""
    recompute = mode == "keep" and clear_cache
    try:
        await client.pause_generation(mode, recompute=recompute)
    except EngineStateError as exc:  # already paused in another mode: the caller's mistake
        raise ValueError(str(exc)) from None
    if clear_cache and mode != "keep" and client.capabilities.prefix_caching:
        await client.reset_prefix_cache()


class VLLMRLState:
    """The server's side of vLLM's RL API: the weight transfer's phases, and sleep as vLLM does it
    (its scheduler paused to sleep, resumed once every memory tag is awake again)."""

    def __init__(self, client: Any, options: VLLMRLOptions) -> None:
        self.client = client
        self.options = options
        self.transfer = PhasedWeightTransfer(client, options.weight_transfer_backend)

    async def asleep_tags(self) -> set[str]:
        tags: set[str] = set()
        for state in (await engine_states(self.client)).values():
            tags.update(state.get("asleep") or ())
        return tags

    async def sleep(self, level: int, mode: str) -> None:
        """vLLM's ``sleep(level, mode)``: pause in ``mode`` (level 0 stops there), then release the
        engines' memory. A level >= 1 sleep cannot keep requests here: every engine's sleep ends the
        requests it runs (their callers get partial output), so ``mode=keep`` is refused."""
        if level >= 1:
            caps = self.client.capabilities
            if not caps.sleep_levels:
                raise UnsupportedCapabilityError(self.client.backend, "sleep",
                                                 "The engines declare no sleep level (vLLM on CPU, for one).")
            if mode == "keep":
                raise UnsupportedCapabilityError(
                    self.client.backend, "sleep with mode=keep",
                    "Requests cannot be kept through a sleep that releases memory here; sleep with mode=abort "
                    "or mode=wait, or pause with mode=keep.")
        paused_here = not self.client.paused
        if paused_here:
            # vLLM's level-0 sleep keeps its caches; deeper ones are cleared by the sleep itself.
            await pause(self.client, mode, clear_cache=False)
        if level >= 1:
            try:
                await self.client.sleep(level=level, abort_first=True)
            except BaseException:
                if paused_here:  # nothing slept: serve again, as before the call
                    await self.client.resume_generation()
                raise

    async def wake_up(self, tags: list[str] | None) -> bool:
        memory = None if tags is None else [t for t in tags if t != SCHEDULING_TAG]
        if (memory is None or memory) and await self.asleep_tags():
            await self.client.wake_up(memory)
        fully_awake = not await self.asleep_tags()
        if fully_awake:
            # As vLLM: scheduling resumes once all memory is resident again, whichever tags woke it
            # (and whoever paused it: vLLM's wake_up resumes a /pause too).
            if self.client.paused:
                await self.client.resume_generation()
        return fully_awake


def vllm_rl_router(client: Any, options: VLLMRLOptions) -> APIRouter:
    """The routes, over ``client`` (an :class:`~skyrl_backends.client.InferenceEngineClient`)."""
    state = VLLMRLState(client, options)
    router = APIRouter()

    def route(method: str, path: str, *, in_workers: bool = False):
        """Register ``handler``; ``in_workers``: a call vLLM's workers answer (the weight transfer),
        whose every failure vLLM's HTTP server answers 500, a refused payload included."""
        answer = internal_error if in_workers else error_response

        def register(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:  # every failure is answered as vLLM answers it
                    return answer(exc)

            endpoint.__name__ = f"vllm_rl_{handler.__name__}"
            router.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
            return handler
        return register

    # -- pause, resume, abort ----------------------------------------------------------------------
    @route("POST", "/pause")
    async def pause_generation(request: Request) -> Response:
        mode = _query_mode(request)
        clear_cache = _query_bool(request, "clear_cache", True)
        try:
            await pause(client, mode, clear_cache)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:
            logger.exception("pause failed")
            return JSONResponse({"error": f"Failed to pause generation: {exc}"}, status_code=500)
        return JSONResponse({"status": "paused"})

    @route("POST", "/resume")
    async def resume_generation(request: Request) -> Response:
        try:
            await client.resume_generation()
        except Exception as exc:
            logger.exception("resume failed")
            return JSONResponse({"error": f"Failed to resume generation: {exc}"}, status_code=500)
        return JSONResponse({"status": "resumed"})

    @route("POST", "/abort_requests")
    async def abort_requests(request: Request) -> Response:
        body = await _json_body(request)
        ids = body.get("request_ids")
        if ids and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise VLLMHTTPError(400, "request_ids must be a list of strings", param="body.request_ids")
        if ids:
            await client.abort(ids)
            return JSONResponse({"status": "aborted", "aborted": len(ids)})
        count = sum(int(info.get("inflight", 0)) for info in client.health().values())
        await client.abort()
        return JSONResponse({"status": "aborted", "aborted": count})

    @route("GET", "/is_paused")
    async def is_paused(request: Request) -> Response:
        return JSONResponse({"is_paused": bool(client.paused)})

    # -- weight transfer -----------------------------------------------------------------------------
    @route("POST", "/init_weight_transfer_engine", in_workers=True)
    async def init_weight_transfer_engine(request: Request) -> Response:
        init_info = _field(await _json_body(request), "init_info", (dict,), required=True)
        await state.transfer.initialize(init_info)
        return JSONResponse({"message": "Weight transfer initialized"})

    @route("POST", "/shutdown_weight_transfer_engine", in_workers=True)
    async def shutdown_weight_transfer_engine(request: Request) -> Response:
        await state.transfer.shutdown()
        return JSONResponse({"message": "Weight transfer shut down"})

    @route("POST", "/start_weight_update", in_workers=True)
    async def start_weight_update(request: Request) -> Response:
        await state.transfer.start()
        return JSONResponse({"message": "Weight update started"})

    @route("POST", "/start_draft_weight_update", in_workers=True)
    async def start_draft_weight_update(request: Request) -> Response:
        raise EngineStateError("Draft model weight update requested, but no draft model is configured.")

    @route("POST", "/update_weights", in_workers=True)
    async def update_weights(request: Request) -> Response:
        update_info = _field(await _json_body(request), "update_info", (dict, list), required=True)
        if isinstance(update_info, list) and not all(isinstance(item, dict) for item in update_info):
            raise VLLMHTTPError(400, "Input should be a valid dictionary: update_info[...]", param="body.update_info")
        await state.transfer.update(update_info)
        return JSONResponse({"message": "Weights updated"})

    @route("POST", "/finish_weight_update", in_workers=True)
    async def finish_weight_update(request: Request) -> Response:
        version = _field(await _json_body(request, required=False), "weight_version", (str,), required=False)
        await state.transfer.finish(version)
        return JSONResponse({"message": "Weight update finished"})

    @route("POST", "/update_weight_version")
    async def update_weight_version(request: Request) -> Response:
        version = _field(await _json_body(request), "new_version", (str,), required=True)
        state.transfer.version = version
        return JSONResponse({"success": True, "new_version": version})

    @route("GET", "/weight_info")
    async def weight_info(request: Request) -> Response:
        return JSONResponse({"weight_version": state.transfer.version})

    @route("POST", "/weight_checker")
    async def weight_checker(request: Request) -> Response:
        body = await _json_body(request)
        action = body.get("action")
        if action not in ("checksum", "reset", "compare"):
            raise VLLMHTTPError(400, "Input should be 'checksum', 'reset' or 'compare'", param="body.action")
        if action == "compare" and body.get("baseline") is None:
            raise VLLMHTTPError(400, "action='compare' requires a 'baseline' object")
        raise NotImplementedError("weight checksums are not available through skyrl-backends serve (the engine API "
                                  "has no checksum call); compare generations instead")

    @route("GET", "/get_world_size")
    async def get_world_size(request: Request) -> Response:
        return JSONResponse({"world_size": world_size(client, _query_bool(request, "include_dp", True))})

    @route("POST", "/collective_rpc")
    async def collective_rpc(request: Request) -> Response:
        await _json_body(request)
        raise NotImplementedError("collective_rpc calls vLLM worker methods by name; skyrl-backends serve has no "
                                  "vLLM workers to call (its engines are any backend)")

    # -- memory and caches ---------------------------------------------------------------------------
    @route("POST", "/sleep")
    async def sleep(request: Request) -> Response:
        raw_level = request.query_params.get("level", "1")
        if not raw_level.lstrip("-").isdigit() or not 0 <= int(raw_level) <= 2:
            raise VLLMHTTPError(400, f"Input should be an integer from 0 to 2, got {raw_level!r}",
                                param="query.level")
        level = int(raw_level)
        await state.sleep(level, _query_mode(request))
        return JSONResponse({"status": "sleeping", "level": level})

    @route("POST", "/wake_up")
    async def wake_up(request: Request) -> Response:
        tags = request.query_params.getlist("tags") or None
        fully_awake = await state.wake_up(tags)
        return JSONResponse({"status": "awake" if fully_awake else "sleeping", "tags": tags})

    @route("GET", "/is_sleeping")
    async def is_sleeping(request: Request) -> Response:
        # vLLM: asleep at any level, a paused scheduler (level 0) included.
        return JSONResponse({"is_sleeping": bool(client.paused) or bool(await state.asleep_tags())})

    @route("POST", "/release_kv_cache_memory")
    async def release_kv_cache_memory(request: Request) -> Response:
        if not client.paused:
            raise EngineStateError("release_kv_cache_memory() requires a completed pause first")
        await client.sleep(["kv_cache"])
        return JSONResponse({"status": "kv_cache_released"})

    @route("POST", "/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        _query_bool(request, "reset_running_requests", False)
        _query_bool(request, "reset_external", False)
        await client.reset_prefix_cache()
        return JSONResponse({"success": True})

    @route("POST", "/reset_mm_cache")
    async def reset_mm_cache(request: Request) -> Response:
        return Response(status_code=200)  # engines here take token ids only: no multi-modal cache

    @route("POST", "/reset_encoder_cache")
    async def reset_encoder_cache(request: Request) -> Response:
        return Response(status_code=200)

    # -- LoRA and server information -----------------------------------------------------------------
    @route("POST", "/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = await _json_body(request)
        name = body.get("lora_name")
        path = body.get("lora_path")
        if not name or not path or not isinstance(name, str) or not isinstance(path, str):
            return vllm_error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name == options.model_name:
            return vllm_error(400, f"The lora adapter '{name}' conflicts with a served base model.",
                              "InvalidUserInput")
        await client.load_lora_adapter(name, path)
        return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)

    @route("POST", "/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await _json_body(request)
        name = body.get("lora_name")
        if not name or not isinstance(name, str):
            return vllm_error(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        await client.unload_lora_adapter(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", status_code=200)

    @route("GET", "/server_info")
    async def server_info(request: Request) -> Response:
        config_format = request.query_params.get("config_format", "text")
        if config_format not in ("text", "json"):
            raise VLLMHTTPError(400, "Input should be 'text' or 'json'", param="query.config_format")
        config = server_config(client, options)
        return JSONResponse({"vllm_config": config if config_format == "json" else json.dumps(config),
                             "vllm_env": {}, "system_env": {}})

    return router


def server_config(client: Any, options: VLLMRLOptions) -> dict[str, Any]:
    """The part of vLLM's ``/server_info`` config that describes the served model, as vLLM spells it
    (trainers read ``model_config.dtype`` to send weights in the engines' dtype)."""
    sizes = client.parallel_sizes()
    return {
        "model_config": {"model": options.model_path or options.model_name, "served_model_name": options.model_name,
                         "dtype": f"torch.{options.dtype}" if options.dtype else None,
                         "max_model_len": options.max_model_len},
        "parallel_config": {"tensor_parallel_size": sizes.tensor, "pipeline_parallel_size": sizes.pipeline,
                            "data_parallel_size": len(getattr(client, "engines", []) or [client])},
        "weight_transfer_config": ({"backend": options.weight_transfer_backend}
                                   if options.weight_transfer_backend else None),
        "skyrl_backend": client.backend,
        "skyrl_engine_version": client.engine_version(),
    }


async def engines_dtype(client: Any) -> str | None:
    """The dtype the engines hold their weights in (the most common among their parameters)."""
    specs = await client.weight_specs()
    dtypes = [s.dtype for s in (specs.values() if isinstance(specs, Mapping) else specs)]
    return max(set(dtypes), key=dtypes.count) if dtypes else None


__all__ = ["VLLMRLOptions", "engines_dtype", "error_response", "pause", "vllm_rl_router"]
