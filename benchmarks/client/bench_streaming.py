"""Per-token server time of a streamed response at 512, 2k, 8k and 32k tokens: the endpoint's
incremental detokenizer and stop-string matcher against the whole-response re-decoding they
replaced, in the same run.

What is timed is the server's work per streamed token, without a network or a model in the way:
the ASGI app (guards, routes, client, SSE formatting) is driven in-process and its engine is a
replay double that hands out a fixed token sequence one token per chunk, running every token
through a stop-string matcher as the transformers backend does. Tokens are the tiny model's real
tokenizer's encoding of a mixed-script text (multi-byte characters split across tokens included),
and the request sets a stop string that never matches, so the hold-back path is exercised too.

The baseline ("before") swaps in the previous algorithms, kept below verbatim in behaviour: the
streamed text and the stop matcher each decoded the whole response after every token (commit
977fe0b). Goal: per-token time flat in the length, <= 2 ms per token at 8k.

    .venv/transformers/bin/python benchmarks/client/bench_streaming.py --model .cache/tiny-model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from skyrl_backends.types import Capabilities, Completion, GenerateOutput, GenerateRequest, StreamChunk

REPLACEMENT = "\ufffd"
TEXT = ("Streaming tokens, one at a time: Grüße aus Köln, 東京の天気は晴れ, naïve café — 🙂🚀 "
        "and plain ASCII words that byte-level BPE merges into longer pieces. ")
STOP = "<<never in this text>>"


# -- the algorithms this benchmark compares against (previous code, for the baseline) ------------
class WholeDecodeText:
    """The previous streamed-text algorithm: decode every token so far after each chunk."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self.sent = ""

    def feed(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        stable = len(text.rstrip(REPLACEMENT)) - self._holdback
        if stable <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):stable]
        self.sent += delta
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.sent):]
        self.sent = final_text
        return delta


class WholeDecodeStopMatcher:
    """The previous stop-string matcher: decode the whole response after each token."""

    def __init__(self, stop: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stop = tuple(stop)
        self._decode = decode
        self._longest = max((len(s) for s in self.stop), default=0)
        self._checked_upto = 0

    def feed(self, response_ids: list[int]) -> tuple[str, str] | None:
        text = self._decode(response_ids)
        first = text.find(REPLACEMENT)
        start = max(0, min(self._checked_upto, first if first != -1 else self._checked_upto) - self._longest)
        self._checked_upto = len(text)
        for s in self.stop:
            pos = text.find(s, start)
            if pos != -1:
                return s, text[: pos + len(s)]
        return None


# -- the engine double -----------------------------------------------------------------------------
class ReplayEngine:
    """Test double with the engine API: streams a fixed token sequence, one token per chunk,
    feeding every token to a stop-string matcher as a backend that detokenizes itself does."""

    capabilities = Capabilities(streaming=True, stop_strings=True, abort=True)

    def __init__(self, tokens: list[int], decode: Callable[[list[int]], str], matcher_cls: Any) -> None:
        self.tokens, self.decode, self.matcher_cls = tokens, decode, matcher_cls

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        params = request.sampling_params
        matcher = self.matcher_cls(params.stop, self.decode)
        out: list[int] = []
        for token in self.tokens[: params.max_generate_length]:
            out.append(token)
            if matcher.feed(out) is not None:
                raise AssertionError("the benchmark's stop string must never match")
            if len(out) < params.max_generate_length:
                yield StreamChunk(0, [token])
                await asyncio.sleep(0)
        completion = Completion(out, "length", text=self.decode(out), request_id=request.request_ids[0])
        yield StreamChunk.final(0, completion, len(out) - 1)

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        raise NotImplementedError("the benchmark streams only")


async def stream_once(app: Any, max_tokens: int) -> tuple[float, int]:
    """Drive one streamed /v1/completions request through the ASGI app; (seconds, body bytes)."""
    body = json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": max_tokens, "stream": True,
                       "stop": [STOP], "temperature": 0}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    sent = False
    size = 0
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal size
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"status {message['status']}")
        if message["type"] == "http.response.body":
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    started = time.perf_counter()
    await app(scope, receive, send)
    return time.perf_counter() - started, size


def run_case(tokenizer: Any, tokens: list[int], size: int, variant: str) -> float:
    import skyrl_backends.http.streaming as streaming
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import create_app
    from skyrl_backends.stopping import StopStringMatcher

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    before = variant == "before"
    original = streaming.IncrementalText
    streaming.IncrementalText = WholeDecodeText if before else original  # type: ignore[misc]
    try:
        engine = ReplayEngine(tokens, decode, WholeDecodeStopMatcher if before else StopStringMatcher)

        async def go() -> float:
            client = InferenceEngineClient([engine])
            app = create_app(client, tokenizer, model_name="tiny")
            seconds, _ = await stream_once(app, size)
            return seconds

        return asyncio.run(go())
    finally:
        streaming.IncrementalText = original  # type: ignore[misc]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder whose tokenizer is used")
    parser.add_argument("--sizes", default="512,2048,8192,32768")
    parser.add_argument("--baseline-sizes", default="512,2048,8192",
                        help="sizes the quadratic baseline runs at (32768 takes many minutes)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    baseline_sizes = {int(s) for s in args.baseline_sizes.split(",") if s}
    tokens: list[int] = []
    while len(tokens) < max(sizes):
        tokens += tokenizer.encode(TEXT, add_special_tokens=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}; commit {commit}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'tokens':>7} | {'after ms/token':>14} | {'before ms/token':>15} | {'before / after':>14}")
    rows = []
    run_case(tokenizer, tokens, 64, "after")  # warm-up (imports, first app)
    for size in sizes:
        after = run_case(tokenizer, tokens, size, "after") / size * 1e3
        before = run_case(tokenizer, tokens, size, "before") / size * 1e3 if size in baseline_sizes else None
        ratio = f"{before / after:.1f}x" if before else "-"
        print(f"{size:>7} | {after:>14.3f} | {before if before is not None else '-':>15} | {ratio:>14}"
              if before is None else f"{size:>7} | {after:>14.3f} | {before:>15.3f} | {ratio:>14}", flush=True)
        rows.append({"tokens": size, "after_ms_per_token": after, "before_ms_per_token": before})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "commit": commit, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
