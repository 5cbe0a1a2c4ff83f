"""Exact stop-string semantics, shared by every backend that detokenizes itself.

A sequence stops at the first generated token whose decoded text completes an occurrence of a stop
string. That token is the last response token; the response text ends exactly where the stop
string ends (the string included), and the matched string is the stop reason. Only response text is
searched, never the prompt. Engines that match stop strings themselves (vLLM) have the same
semantics; engines that cannot (SGLang in token-in mode) stream tokens through this matcher.

This is the engine API's rule. The OpenAI-compatible HTTP endpoint follows OpenAI instead and leaves
the stop string out of the text it returns (:mod:`skyrl_backends.http`); token ids are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from skyrl_backends.detokenize import IncrementalDetokenizer
from skyrl_backends.sampling import SamplingParams


class StopStringMatcher:
    """Feeds a growing list of response token ids and reports the first stop-string match.

    Text is decoded incrementally (:class:`~skyrl_backends.detokenize.IncrementalDetokenizer`), so a
    token costs O(1) however long the response is: only the new text, the ``len(longest stop) - 1``
    characters before it and the trailing replacement characters of an incomplete character are
    searched, which is the text a whole decode of the response gives (a multi-byte character split
    across tokens reads U+FFFD until its last byte arrives, as it does in a whole decode). The
    whole text is joined once, at the match.
    """

    def __init__(self, stop: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stop = tuple(stop)
        self._text = IncrementalDetokenizer(decode)
        self._overlap = max((len(s) for s in self.stop), default=1) - 1
        self._fed = 0
        self._pieces: list[str] = []
        self._tail = ""  # the last ``_overlap`` characters of the text searched so far

    def __bool__(self) -> bool:
        return bool(self.stop)

    def feed(self, response_ids: Sequence[int]) -> tuple[str, str] | None:
        """After tokens were appended to ``response_ids`` (the whole response so far, which only
        ever grows): ``(matched stop string, text truncated after it)`` or None."""
        if not self.stop:
            return None
        if len(response_ids) < self._fed:
            raise ValueError(f"the response shrank from {self._fed} to {len(response_ids)} tokens; "
                             "feed a growing response, or use a new matcher")
        new = response_ids[self._fed:]
        self._fed = len(response_ids)
        delta = self._text.push(list(new))
        pending = self._text.pending
        if not delta and not pending:
            return None
        # The text a whole decode gives now: what was searched, the new stable text, and the
        # trailing replacement characters still held back (a stop string may contain them).
        window = self._tail + delta + pending
        best: tuple[int, str] | None = None  # the match that ends first
        for s in self.stop:
            pos = window.find(s)
            if pos != -1 and (best is None or pos + len(s) < best[0] + len(best[1])):
                best = (pos, s)
        if best is None:
            if delta:
                self._pieces.append(delta)
                stable = self._tail + delta
                self._tail = stable[-self._overlap:] if self._overlap else ""
            return None
        pos, s = best
        text = "".join(self._pieces) + delta + pending
        end = len(text) - len(window) + pos + len(s)
        return s, text[:end]


def stop_on_last_token(finish: str, tokens: Sequence[int], stop_reason: Any, params: SamplingParams,
                       eos_token_ids: Collection[int]) -> tuple[str, Any]:
    """``(finish, stop_reason)`` with a stop token id (or EOS, unless ignored) that is also the last
    token ``max_generate_length`` allows counted as a stop, as on every backend: SGLang 0.5.17
    reports it as ``"length"``. The stop reason becomes that token."""
    if finish != "length" or not tokens:
        return finish, stop_reason
    last = tokens[-1]
    if last in params.stop_token_ids or (not params.ignore_eos and last in eos_token_ids):
        return "stop", last
    return finish, stop_reason
