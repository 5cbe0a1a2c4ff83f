"""OpenAI response bodies, streamed and not, built from the engines' completions.

Log-probabilities: chat ``logprobs.content`` has one entry per token with its raw ``bytes`` and the
top ``top_logprobs`` alternatives. Completions ``logprobs.top_logprobs[i]`` always holds the sampled
token as well as the top ``logprobs`` alternatives (up to ``logprobs + 1`` entries, as OpenAI says).
Its keys are token texts; distinct tokens that decode to the same text at one position (byte
fallback pieces all decode to U+FFFD) never overwrite each other: the sampled token keeps its text
(so ``top_logprobs[i][tokens[i]]`` is its log-probability) and any other token whose text is
already taken is keyed ``"token_id:N"``, vLLM's form. ``return_tokens_as_token_ids`` keys every
token that way.

``return_token_ids`` (vLLM's extension) adds the token ids: chat responses carry the prompt's ids
at the top level (``prompt_token_ids``) and each choice its ``token_ids``; completions carry both
per choice. Streams put ``prompt_token_ids`` on the first event of each choice and the new
``token_ids`` on every event that has tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from skyrl_backends.http.schemas import ChatCompletionRequest, CompletionRequest
from skyrl_backends.http.serving import ServingState
from skyrl_backends.http.streaming import ChoiceStreams
from skyrl_backends.http.text import TextCodec
from skyrl_backends.types import GenerateOutput, StreamChunk


def token_key(codec: TextCodec, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else codec.token_text(token_id)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- log-probabilities -----------------------------------------------------------------------------
def chat_logprobs(codec: TextCodec, token_ids: list[int], logprobs: list[float] | None,
                  top: list[dict[int, float]] | None, as_ids: bool) -> Any:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_key(codec, token_id, as_ids), "logprob": logprob, "bytes": codec.token_bytes(token_id)}

    content = []
    for k, token in enumerate(token_ids):
        item = entry(token, logprobs[k])
        item["top_logprobs"] = [entry(t, lp) for t, lp in (top[k] if top else {}).items()]
        content.append(item)
    return {"content": content}


def completion_top_logprobs(codec: TextCodec, token_id: int, logprob: float, top: dict[int, float],
                            as_ids: bool) -> dict[str, float]:
    """The sampled token and the top alternatives at one position, by descending log-probability,
    keyed so that no entry overwrites another (see the module docstring)."""
    keys: dict[int, str] = {token_id: token_key(codec, token_id, as_ids)}
    taken = {keys[token_id]}
    values = {token_id: logprob}
    for t, lp in top.items():
        if t == token_id:
            continue
        key = token_key(codec, t, as_ids)
        if key in taken:
            key = f"token_id:{t}"
        taken.add(key)
        keys[t], values[t] = key, lp
    return {keys[t]: values[t] for t in sorted(values, key=lambda t: -values[t])}


def completion_logprobs(codec: TextCodec, token_ids: list[int], logprobs: list[float] | None,
                        top: list[dict[int, float]] | None, offsets: list[int], as_ids: bool) -> Any:
    if logprobs is None:
        return None
    return {"tokens": [token_key(codec, t, as_ids) for t in token_ids], "token_logprobs": list(logprobs),
            "top_logprobs": [completion_top_logprobs(codec, t, logprobs[k], top[k] if top else {}, as_ids)
                             for k, t in enumerate(token_ids)],
            "text_offset": offsets}


# -- chat ------------------------------------------------------------------------------------------
def chat_response(state: ServingState, body: ChatCompletionRequest, model: str, prompt: list[int],
                  output: GenerateOutput) -> dict[str, Any]:
    as_ids = body.return_tokens_as_token_ids
    choices = []
    for i, c in enumerate(output):
        choice: dict[str, Any] = {
            "index": i, "message": {"role": "assistant", "content": state.text_of(c)},
            "logprobs": chat_logprobs(state.codec, c.token_ids, c.logprobs, c.top_logprobs, as_ids),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if body.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        choices.append(choice)
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": choices,
        "usage": usage(len(prompt), sum(len(c.token_ids) for c in output))}
    if body.return_token_ids:
        response["prompt_token_ids"] = list(prompt)
    return response


async def chat_events(state: ServingState, body: ChatCompletionRequest, model: str, prompt: list[int],
                      choices: ChoiceStreams, source: AsyncIterator[tuple[int, str, StreamChunk]],
                      stats: StreamStats) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    as_ids, with_ids = body.return_tokens_as_token_ids, body.return_token_ids

    def event(choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        data = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice], **extra}
        if include_usage:
            data["usage"] = None
        return data

    for i in range(len(choices.texts)):
        extra = {"prompt_token_ids": list(prompt)} if with_ids and i == 0 else {}
        yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}, **extra)
    async for i, delta, chunk in source:
        stats.tokens(len(chunk.token_ids))
        has_logprobs = bool(chunk.token_ids) and chunk.logprobs is not None
        if delta or has_logprobs or (with_ids and chunk.token_ids):
            choice: dict[str, Any] = {
                "index": i, "delta": {"content": delta}, "finish_reason": None,
                "logprobs": chat_logprobs(state.codec, chunk.token_ids, chunk.logprobs, chunk.top_logprobs, as_ids)
                if has_logprobs else None}
            if with_ids:
                choice["token_ids"] = list(chunk.token_ids)
            yield event(choice)
        if chunk.completion is not None:
            yield event({"index": i, "delta": {}, "logprobs": None, "finish_reason": chunk.completion.finish_reason,
                         "stop_reason": chunk.completion.stop_reason})
    if include_usage:
        yield {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [], "usage": usage(len(prompt), choices.completion_tokens())}


# -- completions -----------------------------------------------------------------------------------
def echoes(state: ServingState, body: CompletionRequest, raw_prompts: list[Any], count: int) -> list[str]:
    if not body.echo:
        return [""] * count
    return [(raw if isinstance(raw, str) else state.codec.decode(raw))
            for raw in (raw_prompts[i // body.n] for i in range(count))]


def _offsets(pieces: list[str], start: int) -> list[int]:
    offsets, position = [], start
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return offsets


def completion_response(state: ServingState, body: CompletionRequest, model: str, raw_prompts: list[Any],
                        prompts: list[list[int]], output: GenerateOutput) -> dict[str, Any]:
    as_ids = body.return_tokens_as_token_ids
    choices = []
    for i, (c, echo) in enumerate(zip(output, echoes(state, body, raw_prompts, len(output)))):
        text = state.text_of(c)
        logprobs = None
        if c.logprobs is not None:
            offsets = _offsets(state.codec.pieces(c.token_ids, text), len(echo))
            logprobs = completion_logprobs(state.codec, c.token_ids, c.logprobs, c.top_logprobs, offsets, as_ids)
        choice: dict[str, Any] = {"index": i, "text": echo + text, "logprobs": logprobs,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if body.return_token_ids:
            choice["prompt_token_ids"] = list(prompts[i // body.n])
            choice["token_ids"] = list(c.token_ids)
        choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(sum(len(p) for p in prompts), sum(len(c.token_ids) for c in output))}


async def completion_events(state: ServingState, body: CompletionRequest, model: str, raw_prompts: list[Any],
                            prompts: list[list[int]], choices: ChoiceStreams,
                            source: AsyncIterator[tuple[int, str, StreamChunk]],
                            stats: StreamStats) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    codec, as_ids, with_ids = state.codec, body.return_tokens_as_token_ids, body.return_token_ids

    def event(choice: dict[str, Any]) -> dict[str, Any]:
        data = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return data

    count = len(choices.texts)
    positions = [0] * count
    for i, echo in enumerate(echoes(state, body, raw_prompts, count)):
        if echo or with_ids:
            choice: dict[str, Any] = {"index": i, "text": echo, "logprobs": None, "finish_reason": None}
            if with_ids:
                choice["prompt_token_ids"] = list(prompts[i // body.n])
                choice["token_ids"] = []
            positions[i] = len(echo)
            yield event(choice)
    async for i, delta, chunk in source:
        stats.tokens(len(chunk.token_ids))
        has_logprobs = bool(chunk.token_ids) and chunk.logprobs is not None
        if delta or has_logprobs or (with_ids and chunk.token_ids):
            logprobs = None
            if has_logprobs:
                # Offsets of a chunk's tokens are approximated by the chunk's start: token texts and
                # text deltas need not align once characters span tokens.
                logprobs = completion_logprobs(codec, chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                                               [positions[i]] * len(chunk.token_ids), as_ids)
            choice = {"index": i, "text": delta, "logprobs": logprobs, "finish_reason": None}
            if with_ids:
                choice["token_ids"] = list(chunk.token_ids)
            yield event(choice)
            positions[i] += len(delta)
        if chunk.completion is not None:
            yield event({"index": i, "text": "", "logprobs": None, "finish_reason": chunk.completion.finish_reason,
                         "stop_reason": chunk.completion.stop_reason})
    if include_usage:
        yield {"id": response_id, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": usage(sum(len(p) for p in prompts), choices.completion_tokens())}


class StreamStats:
    """Token timing of one stream, for the metrics."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.count = 0

    def tokens(self, count: int) -> None:
        if count and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.count += count


