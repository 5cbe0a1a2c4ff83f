"""Server-sent events for ``stream: true``: OpenAI chunks built from the engines' token chunks as
they arrive (:meth:`InferenceEngineClient.generate_stream`).

Text deltas come from incremental detokenization with the external tokenizer
(:class:`IncrementalText`, O(1) per token): the text of the tokens so far, less what may still
change, is sent as it grows; the choice's final text settles the rest, so the deltas of a choice
join to exactly the text a non-streamed request returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from skyrl_backends.client.streaming import merge_streams
from skyrl_backends.detokenize import IncrementalDetokenizer
from skyrl_backends.types import Completion, StreamChunk


class IncrementalText:
    """The growing text of one choice's tokens, handed out in deltas that are never taken back.

    Held back: a trailing incomplete UTF-8 character (decoded as U+FFFD until its last byte
    arrives) and, while stop strings are set, the last ``len(longest stop string) - 1`` characters,
    which a stop string completed by a later token would cut (the endpoint leaves the stop string
    out of the text, as OpenAI does). The final text completes the deltas."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._text = IncrementalDetokenizer(decode)
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._pending = ""  # decoded, held back for stop strings
        self._sent: list[str] = []

    @property
    def sent(self) -> str:
        return "".join(self._sent)

    def feed(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        pending = self._pending + self._text.push(token_ids)
        cut = max(0, len(pending) - self._holdback)
        delta, self._pending = pending[:cut], pending[cut:]
        if delta:
            self._sent.append(delta)
        return delta

    def finish(self, final_text: str) -> str:
        """What completes the deltas to ``final_text``."""
        sent = self.sent
        if not final_text.startswith(sent):  # cannot happen with a prefix-stable tokenizer
            raise ValueError(f"streamed text {sent[-50:]!r} is not a prefix of the final text {final_text[-50:]!r}")
        delta = final_text[len(sent):]
        self._sent = [final_text]
        self._pending = ""
        return delta


class ChoiceStreams:
    """Every choice of a request as ``(choice index, text delta, chunk)``: one client stream per
    prompt, choice ``prompt * n + sample`` as in the non-streamed response."""

    def __init__(self, client: Any, prompts: list[list[int]], fields: dict[str, Any], session_id: str | None,
                 decode: Callable[[list[int]], str], text_of: Callable[[Completion], str],
                 lora_name: str | None = None) -> None:
        self.client, self.prompts, self.fields, self.session_id = client, prompts, fields, session_id
        self.lora_name = lora_name
        self.n = int(fields.get("n", 1))
        self.text_of = text_of
        stop = fields.get("stop") or ()
        self.texts = [IncrementalText(decode, [stop] if isinstance(stop, str) else stop)
                      for _ in range(len(prompts) * self.n)]
        self.completions: dict[int, Completion] = {}
        self.tokens_seen = 0

    async def __aiter__(self) -> AsyncIterator[tuple[int, str, StreamChunk]]:
        streams = [self.client.generate_stream([p], self.fields, session_ids=[self.session_id], lora_name=self.lora_name)
                   for p in self.prompts]
        async for number, chunk in merge_streams(streams):
            index = number * self.n + chunk.index
            text = self.texts[index]
            self.tokens_seen += len(chunk.token_ids)
            if chunk.completion is not None:
                # The last chunk's text is the final text's rest: its tokens may run past a stop
                # string, which the final text leaves out.
                delta = text.finish(self.text_of(chunk.completion))
                self.completions[index] = chunk.completion
            else:
                delta = text.feed(chunk.token_ids)
            yield index, delta, chunk

    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions.values())


async def prefetched(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``events`` with its first item already awaited, so errors before the first chunk (bad
    parameters, no engine) become a normal error response instead of a broken stream."""
    iterator = events.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[Any]:
        if first is not None:
            yield first
            async for item in iterator:
                yield item

    return rest()
