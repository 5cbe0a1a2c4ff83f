"""Exact stop-string semantics, shared by every backend that detokenizes itself.

A sequence stops at the first generated token whose decoded text completes an occurrence of a stop
string. That token is the last response token; the response text ends exactly where the stop
string ends (the string included), and the matched string is the stop reason. Only response text is
searched, never the prompt. Engines that match stop strings themselves (vLLM) have the same
semantics; engines that cannot (SGLang in token-in mode) stream tokens through this matcher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopStringMatcher:
    """Feeds a growing list of response token ids and reports the first stop-string match.

    Decoding the whole response at each step keeps byte-level BPE correct (a multi-byte character
    split across tokens decodes to U+FFFD until its last byte arrives, and the text before it may
    change); only the tail that could hold a new match is searched.
    """

    def __init__(self, stop: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stop = tuple(stop)
        self._decode = decode
        self._longest = max((len(s) for s in self.stop), default=0)
        self._checked_upto = 0

    def __bool__(self) -> bool:
        return bool(self.stop)

    def feed(self, response_ids: list[int]) -> tuple[str, str] | None:
        """After a token was appended: ``(matched stop string, text truncated after it)`` or None."""
        if not self.stop:
            return None
        text = self._decode(response_ids)
        # A match must end after text already checked; it may start up to len(stop)-1 before it.
        # The replacement character can turn into real text later, so recheck from its position.
        start = max(0, min(self._checked_upto, _first_replacement(text, self._checked_upto)) - self._longest)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = text.find(s, start)
            if pos != -1 and (best is None or pos + len(s) < best[0] + len(best[1])):
                best = (pos, s)
        self._checked_upto = len(text)
        if best is None:
            return None
        pos, s = best
        return s, text[: pos + len(s)]


def _first_replacement(text: str, default: int) -> int:
    index = text.find("\ufffd")
    return index if index != -1 else default
