"""The OpenAI-compatible HTTP app over an :class:`~skyrl_backends.client.InferenceEngineClient`.

``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
Prompts are turned into token ids (chat template included) by the external tokenizer, the client
routes them (``session_id`` keeps a conversation on one engine), and the tokens come back as text.

Streaming (``stream: true``) uses server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``: chunks are sent as the engines produce tokens (:mod:`skyrl_backends.http.streaming`),
and a choice's text deltas join to exactly its non-streamed text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from skyrl_backends.http.errors import APIError, api_error_from, status_type
from skyrl_backends.http.guards import DEFAULT_MAX_BODY_BYTES, ApiKeyGuard, BodySizeGuard
from skyrl_backends.http.schemas import ChatCompletionRequest, CompletionRequest
from skyrl_backends.http.streaming import ChoiceStreams, prefetched
from skyrl_backends.http.text import TextCodec
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, GenerateOutput, GenerateRequest, StreamChunk

logger = logging.getLogger(__name__)


class ServingState:
    def __init__(self, client: Any, tokenizer: Any, model_name: str) -> None:
        self.client = client
        self.codec = TextCodec(tokenizer)
        self.model_name = model_name
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. Served: `{self.model_name}`.",
                           param="model", code="model_not_found")

    async def generate(self, prompts: list[list[int]], fields: dict[str, Any],
                       session_id: str | None) -> GenerateOutput:
        params = SamplingParams.from_dict(fields)
        request = GenerateRequest(prompt_token_ids=prompts, sampling_params=params,
                                  session_ids=[session_id] * len(prompts) if session_id else None)
        return await self.client.generate(request)

    def text_of(self, completion: Completion) -> str:
        return completion.text if completion.text is not None else self.codec.decode(completion.token_ids)


def create_app(client: Any, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """The ASGI app: the FastAPI routes wrapped in the body-size guard and, with ``api_key``, the
    API-key guard. Serve it with uvicorn (see :mod:`skyrl_backends.http.server`)."""
    state = ServingState(client, tokenizer, model_name)
    app = FastAPI(title="skyrl-backends OpenAI-compatible endpoint", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        engines = client.health() if hasattr(client, "health") else {}
        healthy = any(e.get("healthy") for e in engines.values()) if engines else True
        body = {"status": "ok" if healthy else "unavailable",
                "engines": {k: bool(v.get("healthy")) for k, v in engines.items()}}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        model = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "skyrl-backends"}
        return JSONResponse({"object": "list", "data": [model]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _parse(request, ChatCompletionRequest)
        state.check_model(body.model)
        prompt = state.codec.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        fields = body.sampling_fields(body.limit(), body.logprobs_count())
        if body.stream:
            choices = ChoiceStreams(client, [prompt], fields, body.session_id, state.codec.decode, state.text_of)
            source = await prefetched(choices.__aiter__())
            return _sse(_chat_events(state, body, len(prompt), choices, source))
        output = await state.generate([prompt], fields, body.session_id)
        return JSONResponse(_chat_response(state, body, prompt, output))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionRequest)
        state.check_model(body.model)
        raw_prompts = body.prompts()
        prompts = [state.codec.encode(p) if isinstance(p, str) else list(p) for p in raw_prompts]
        fields = body.sampling_fields(body.max_tokens, body.logprobs)
        if body.stream:
            choices = ChoiceStreams(client, prompts, fields, body.session_id, state.codec.decode, state.text_of)
            source = await prefetched(choices.__aiter__())
            return _sse(_completion_events(state, body, raw_prompts, prompts, choices, source))
        output = await state.generate(prompts, fields, body.session_id)
        return JSONResponse(_completion_response(state, body, raw_prompts, prompts, output))

    guarded: Any = BodySizeGuard(app, max_body_bytes)
    if api_key:
        guarded = ApiKeyGuard(guarded, api_key)
    guarded.fastapi_app = app  # for tests and for mounting
    return guarded


# -- parsing and errors --------------------------------------------------------------------------
async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Malformed JSON in the request body: {exc}", code="invalid_json") from None
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


# -- responses -----------------------------------------------------------------------------------
def _usage(prompt_tokens: int, output: GenerateOutput) -> dict[str, int]:
    completion_tokens = sum(len(c.token_ids) for c in output)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_entry(codec: TextCodec, token_id: int, logprob: float) -> dict[str, Any]:
    text = codec.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(codec: TextCodec, completion: Completion, start: int = 0, end: int | None = None) -> Any:
    if completion.logprobs is None:
        return None
    content = []
    stop = len(completion.token_ids) if end is None else end
    for k in range(start, stop):
        entry = _token_entry(codec, completion.token_ids[k], completion.logprobs[k])
        top = completion.top_logprobs[k] if completion.top_logprobs else {}
        entry["top_logprobs"] = [_token_entry(codec, t, lp) for t, lp in top.items()]
        content.append(entry)
    return {"content": content}


def _token_versions(item: Completion | StreamChunk | None) -> list[list[int]] | None:
    """The extension field ``token_versions``: ``[[first token index, weight version], ...]`` over
    the choice's tokens (a completion's, or a stream chunk's own)."""
    versions = item.token_versions if item is not None else None
    return versions.to_json() if versions is not None else None


def _chat_response(state: ServingState, body: ChatCompletionRequest, prompt: list[int], output: GenerateOutput) -> Any:
    choices = [{"index": i, "message": {"role": "assistant", "content": state.text_of(c)},
                "logprobs": _chat_logprobs(state.codec, c), "finish_reason": c.finish_reason,
                "token_versions": _token_versions(c)}
               for i, c in enumerate(output)]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices, "usage": _usage(len(prompt), output)}


def _chunk_logprobs(chunk: StreamChunk) -> Completion:
    """A chunk's tokens as a completion, for the log-probability formatters."""
    return Completion(token_ids=chunk.token_ids, finish_reason="abort", logprobs=chunk.logprobs,
                      top_logprobs=chunk.top_logprobs)


async def _chat_events(state: ServingState, body: ChatCompletionRequest, prompt_tokens: int, choices: ChoiceStreams,
                       source: AsyncIterator[tuple[int, str, StreamChunk]]) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choice: dict[str, Any]) -> dict[str, Any]:
        data = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                "model": state.model_name, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return data

    for i in range(len(choices.texts)):
        yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
    async for i, delta, chunk in source:
        if delta or (chunk.token_ids and chunk.logprobs is not None):
            logprobs = _chat_logprobs(state.codec, _chunk_logprobs(chunk)) if chunk.token_ids else None
            yield event({"index": i, "delta": {"content": delta}, "logprobs": logprobs, "finish_reason": None,
                         **({"token_versions": _token_versions(chunk)} if logprobs else {})})
        if chunk.completion is not None:
            yield event({"index": i, "delta": {}, "logprobs": None, "finish_reason": chunk.completion.finish_reason,
                         "token_versions": _token_versions(chunk.completion)})
    if include_usage:
        yield {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
               "choices": [], "usage": _stream_usage(prompt_tokens, choices)}


def _stream_usage(prompt_tokens: int, choices: ChoiceStreams) -> dict[str, int]:
    completion_tokens = choices.completion_tokens()
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(codec: TextCodec, completion: Completion, text: str, offset: int) -> Any:
    if completion.logprobs is None:
        return None
    pieces = codec.pieces(completion.token_ids, text)
    offsets, position = [], offset
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    top = None
    if completion.top_logprobs:
        top = [{codec.token_text(t): lp for t, lp in step.items()} for step in completion.top_logprobs]
    return {"tokens": [codec.token_text(t) for t in completion.token_ids], "token_logprobs": list(completion.logprobs),
            "top_logprobs": top, "text_offset": offsets}


def _echoes(state: ServingState, body: CompletionRequest, raw_prompts: list[Any], count: int) -> list[str]:
    echoes = []
    for i in range(count):
        raw = raw_prompts[i // body.n]
        echoes.append((raw if isinstance(raw, str) else state.codec.decode(raw)) if body.echo else "")
    return echoes


def _completion_response(state: ServingState, body: CompletionRequest, raw_prompts: list[Any],
                         prompts: list[list[int]], output: GenerateOutput) -> Any:
    choices = []
    for i, (c, echo) in enumerate(zip(output, _echoes(state, body, raw_prompts, len(output)))):
        text = state.text_of(c)
        choices.append({"index": i, "text": echo + text, "logprobs": _completion_logprobs(state.codec, c, text, 0),
                        "finish_reason": c.finish_reason, "token_versions": _token_versions(c)})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices, "usage": _usage(sum(len(p) for p in prompts), output)}


async def _completion_events(state: ServingState, body: CompletionRequest, raw_prompts: list[Any],
                             prompts: list[list[int]], choices: ChoiceStreams,
                             source: AsyncIterator[tuple[int, str, StreamChunk]]) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    codec = state.codec

    def event(choice: dict[str, Any]) -> dict[str, Any]:
        data = {"id": response_id, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return data

    for i, echo in enumerate(_echoes(state, body, raw_prompts, len(choices.texts))):
        if echo:
            yield event({"index": i, "text": echo, "logprobs": None, "finish_reason": None})
    positions = [0] * len(choices.texts)
    async for i, delta, chunk in source:
        if delta or (chunk.token_ids and chunk.logprobs is not None):
            logprobs = None
            if chunk.token_ids and chunk.logprobs is not None:
                # Offsets of a chunk's tokens are approximated by the chunk's start: token texts and
                # text deltas need not align once characters span tokens.
                top = [{codec.token_text(t): lp for t, lp in step.items()} for step in chunk.top_logprobs] \
                    if chunk.top_logprobs else None
                logprobs = {"tokens": [codec.token_text(t) for t in chunk.token_ids],
                            "token_logprobs": list(chunk.logprobs), "top_logprobs": top,
                            "text_offset": [positions[i]] * len(chunk.token_ids)}
            yield event({"index": i, "text": delta, "logprobs": logprobs, "finish_reason": None,
                         **({"token_versions": _token_versions(chunk)} if logprobs else {})})
            positions[i] += len(delta)
        if chunk.completion is not None:
            yield event({"index": i, "text": "", "logprobs": None, "finish_reason": chunk.completion.finish_reason,
                         "token_versions": _token_versions(chunk.completion)})
    if include_usage:
        yield {"id": response_id, "object": "text_completion", "created": created, "model": state.model_name,
               "choices": [], "usage": _stream_usage(sum(len(p) for p in prompts), choices)}


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        async for data in chunks:
            yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
