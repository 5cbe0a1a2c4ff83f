"""The OpenAI-compatible HTTP app over an :class:`~skyrl_backends.client.InferenceEngineClient`.

``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``POST /tokenize``,
``POST /detokenize``, ``GET /metrics``, ``GET /health``. Prompts are turned into token ids (chat
template included) by the external tokenizer, or given as token ids; the client routes them (a
session from ``session_id``, the ``X-Session-ID`` header or ``user`` keeps a conversation on one
engine), and the tokens come back as text, and as ids with ``return_token_ids``.

Streaming (``stream: true``) uses server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``: chunks are sent as the engines produce tokens (:mod:`skyrl_backends.http.streaming`),
and a choice's text deltas join to exactly its non-streamed text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from skyrl_backends.http import responses
from skyrl_backends.http.engine_info import engine_states
from skyrl_backends.http.errors import APIError, api_error_from, status_type
from skyrl_backends.http.guards import Guarded, guard_app
from skyrl_backends.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from skyrl_backends.http.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from skyrl_backends.http.serving import ServingState
from skyrl_backends.http.settings import HTTPSettings
from skyrl_backends.http.streaming import ChoiceStreams, prefetched
from skyrl_backends.http.vllm_rl_routes import VLLMRLOptions, vllm_rl_router

logger = logging.getLogger(__name__)


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt``, or chat ``messages`` through the template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def create_app(client: Any, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               settings: HTTPSettings | None = None, max_body_bytes: int | None = None,
               vllm_rl: VLLMRLOptions | None = None) -> Guarded:
    """The ASGI app: the FastAPI routes behind the guards of :mod:`skyrl_backends.http.guards`
    (``api_key`` turns the key check on). ``settings`` holds every limit; serve the app with
    :mod:`skyrl_backends.http.server`, which applies the connection-level ones. ``vllm_rl`` adds
    vLLM's RL routes (:mod:`skyrl_backends.http.vllm_rl_routes`)."""
    settings = settings or HTTPSettings()
    if max_body_bytes is not None:
        settings = settings.replace(max_body_bytes=max_body_bytes)
    state = ServingState(client, tokenizer, model_name, settings)
    app = FastAPI(title="skyrl-backends OpenAI-compatible endpoint", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state
    _install_error_handlers(app)
    if vllm_rl is not None:
        app.include_router(vllm_rl_router(client, vllm_rl))
    metrics = state.metrics

    @app.get("/health")
    async def health() -> JSONResponse:
        return await _health(client)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        metrics.engine_states.clear()
        metrics.engine_states.update(await engine_states(client))
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        base = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "skyrl-backends",
                "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}
        adapters = [{"id": name, "object": "model", "created": state.created, "owned_by": "skyrl-backends",
                     "root": path, "parent": state.model_name, "max_model_len": state.max_model_len}
                    for name, path in sorted((await state.lora_adapters()).items())]
        return JSONResponse({"object": "list", "data": [base, *adapters]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body: TokenizeRequest = await _parse(request, TokenizeRequest)
        if body.model is not None:
            await state.lora_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages.", param="prompt")
        if body.messages is not None:
            ids = state.codec.chat_prompt([m.for_template() for m in body.messages], body.tools,
                                          body.add_generation_prompt, body.continue_final_message,
                                          body.chat_template_kwargs)
        else:
            ids = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        result: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(result)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        if body.model is not None:
            await state.lora_for(body.model)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the tokenizer's vocabulary (0..{vocab - 1}).",
                           param="tokens")
        return JSONResponse({"prompt": state.codec.decode(body.tokens)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        lora_name = await state.lora_for(body.model)
        state.check_batch(1, body.n)
        if body.prompt_token_ids is not None:
            prompt = list(body.prompt_token_ids)
        else:
            prompt = state.codec.chat_prompt([m.for_template() for m in body.messages], body.template_tools(),
                                             body.add_generation_prompt, body.continue_final_message,
                                             body.chat_template_kwargs)
        prompt_param = "prompt_token_ids" if body.prompt_token_ids is not None else "messages"
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = state.generation_length([prompt], body.limit(), limit_param, prompt_param)
        fields = body.sampling_fields(max_tokens, body.logprobs_count())
        session = state.session_of(body, request.headers)
        if body.stream:
            choices = ChoiceStreams(client, [prompt], fields, session, state.codec.decode, state.text_of, lora_name)
            source = await prefetched(choices.__aiter__())
            stats = responses.StreamStats()
            events = responses.chat_events(state, body, body.model, prompt, choices, source, stats)
            return _sse(events, lambda: _stream_done(state, "/v1/chat/completions", len(prompt), choices, stats))
        output = await state.generate([prompt], fields, session, lora_name)
        state.metrics.count_tokens("/v1/chat/completions", len(prompt), sum(len(c.token_ids) for c in output))
        return JSONResponse(responses.chat_response(state, body, body.model, prompt, output))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        lora_name = await state.lora_for(body.model)
        raw_prompts = body.prompts()
        state.check_batch(len(raw_prompts), body.n)
        prompts = [state.codec.encode(p) if isinstance(p, str) else list(p) for p in raw_prompts]
        max_tokens = state.generation_length(prompts, body.max_tokens, "max_tokens", "prompt")
        fields = body.sampling_fields(max_tokens, body.logprobs)
        session = state.session_of(body, request.headers)
        num_prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            choices = ChoiceStreams(client, prompts, fields, session, state.codec.decode, state.text_of, lora_name)
            source = await prefetched(choices.__aiter__())
            stats = responses.StreamStats()
            events = responses.completion_events(state, body, body.model, raw_prompts, prompts, choices, source,
                                                 stats)
            return _sse(events, lambda: _stream_done(state, "/v1/completions", num_prompt_tokens, choices, stats))
        output = await state.generate(prompts, fields, session, lora_name)
        state.metrics.count_tokens("/v1/completions", num_prompt_tokens, sum(len(c.token_ids) for c in output))
        return JSONResponse(responses.completion_response(state, body, body.model, raw_prompts, prompts, output))

    return guard_app(app, settings, api_key, fastapi_app=app, wrap=metrics.asgi)


async def _health(client: Any) -> JSONResponse:
    """Liveness with the engines' state: 200 while the server can answer, with ``status`` saying
    whether requests would be served now (``"ok"``) or wait or fail (``"paused"``, ``"asleep"``,
    ``"weights_missing"``); 503 (``"unavailable"``) when no engine is healthy."""
    engines = client.health() if hasattr(client, "health") else {}
    states = await engine_states(client) if hasattr(client, "engine_ids") else {}
    report: dict[str, dict[str, Any]] = {}
    for engine_id, info in engines.items():
        state = states.get(engine_id, {})
        if not info.get("healthy"):
            status = "unhealthy"
        elif state.get("asleep"):
            status = "asleep"
        elif state.get("weights_loaded") is False:
            status = "weights_missing"
        elif state.get("paused") or getattr(client, "paused", False):
            status = "paused"
        else:
            status = "ok"
        report[engine_id] = {"healthy": bool(info.get("healthy")), "status": status,
                             "asleep": list(state.get("asleep") or [])}
    statuses = [r["status"] for r in report.values()]
    if not engines:
        overall = "ok"
    elif "ok" in statuses:
        overall = "ok"
    elif all(s == "unhealthy" for s in statuses):
        overall = "unavailable"
    else:
        overall = next(s for s in ("paused", "asleep", "weights_missing") if s in statuses)
    body = {"status": overall, "engines": report}
    return JSONResponse(body, status_code=503 if overall == "unavailable" else 200)


def _stream_done(state: ServingState, endpoint: str, prompt_tokens: int, choices: ChoiceStreams,
                 stats: responses.StreamStats) -> None:
    state.metrics.count_tokens(endpoint, prompt_tokens, stats.count)
    state.metrics.observe_stream(endpoint, stats.started, stats.first_token_at, stats.count)


# -- parsing and errors --------------------------------------------------------------------------
async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Malformed JSON in the request body: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "The request body's JSON is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {loc}"
        else:
            message = f"Invalid value for '{loc}': {first.get('msg')}"
        raise APIError(400, message, param=loc or None) from None
    except RecursionError:
        raise APIError(400, "The request body's JSON is nested too deeply.", code="invalid_json") from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), type=status_type(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(_request: Request, exc: Exception) -> JSONResponse:
        error = api_error_from(exc)
        if error.status >= 500:
            logger.exception("request failed", exc_info=exc)
        return JSONResponse(error.body(), status_code=error.status)


def _sse(chunks: AsyncIterator[dict[str, Any]], on_done: Any = None) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        async for data in chunks:
            yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"
        if on_done is not None:
            on_done()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
