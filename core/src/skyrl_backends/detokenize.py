"""Incremental detokenization: the text of a growing list of token ids, in O(1) per token.

Decoding the whole response after every token costs O(n) per token (O(n^2) per response: 17 s of
decoding for 8k streamed tokens). :class:`IncrementalDetokenizer` decodes a bounded window instead:
a few already-read tokens kept as context (decoders such as SentencePiece's or byte-level BPE's
depend on the previous token) followed by the tokens not yet read. Each new token's text is what
``decode(window)`` adds to the text the window had already produced, which is how vLLM and
tokenizers' ``DecodeStream`` detokenize; it works with any ``decode(ids) -> str`` (a Hugging Face
tokenizer's ``decode`` with its usual options), so it yields exactly the characters a whole decode
gives for every prefix-stable tokenizer (byte-level BPE, SentencePiece with byte fallback, WordPiece).

Held back until a later token settles it: a trailing run of U+FFFD, which is how a multi-byte
character split across tokens decodes until its last byte arrives. A UTF-8 character has at most
four bytes, so once the window holds more than :data:`MAX_WINDOW_TOKENS` tokens such a run is final
(invalid bytes stay invalid) and is handed out: the window, and so the cost per token, stays bounded
even when a model emits garbage bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
# Already-read tokens kept at the start of the window, as context for the next token's text.
CONTEXT_TOKENS = 4
# The window is trimmed back to CONTEXT_TOKENS once it is this long and fully read...
_TRIM_AT = 2 * CONTEXT_TOKENS
# ... and trailing replacement characters are final once it is longer than this.
MAX_WINDOW_TOKENS = 32

Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """Turns token ids, pushed a few at a time, into text deltas that are never taken back.

    ``push(ids)`` returns the text the new tokens complete; the deltas joined are the decoded text of
    every token pushed so far, less a trailing incomplete character (see the module docstring).
    A decoder whose earlier text changes when tokens are added (not prefix-stable) makes the
    deltas wait until the window's text agrees with what was handed out again."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._window: list[int] = []
        self._window_text = ""  # the part of decode(window) already handed out
        self.num_tokens = 0
        # What a whole decode has after the text handed out: the held-back replacement characters.
        self.pending = ""

    def push(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        self.num_tokens += len(token_ids)
        text = self._decode(self._window)
        stable = len(text)
        if len(self._window) <= MAX_WINDOW_TOKENS:
            stable = len(text.rstrip(REPLACEMENT))
        read = self._window_text
        if not text.startswith(read):
            if len(self._window) <= MAX_WINDOW_TOKENS:
                self.pending = ""
                return ""  # wait: the text handed out is not yet a prefix of the window's text
            read = self._window_text = text[:len(read)]  # give up on agreement; keep the cost bounded
        self.pending = text[max(stable, len(read)):]
        if stable <= len(read):
            return ""
        delta = text[len(read):stable]
        if stable == len(text) and len(self._window) >= _TRIM_AT:
            self._window = self._window[-CONTEXT_TOKENS:]
            self._window_text = self._decode(self._window)
        else:
            self._window_text = text[:stable]
        return delta


def incremental_pieces(decode: Decode, token_ids: Sequence[int], final_text: str) -> list[str]:
    """One text piece per token, joined exactly ``final_text`` (the response's text, which a stop
    string may have cut inside the last tokens): each token's incremental delta, clipped to
    ``final_text``; a token that ends inside a multi-byte character has an empty piece. O(n)."""
    detokenizer = IncrementalDetokenizer(decode)
    pieces: list[str] = []
    emitted = 0
    for k, token in enumerate(token_ids):
        if k == len(token_ids) - 1:
            pieces.append(final_text[emitted:])
            break
        delta = detokenizer.push([token])
        end = min(emitted + len(delta), len(final_text))
        pieces.append(final_text[emitted:end])
        emitted = end
    return pieces
