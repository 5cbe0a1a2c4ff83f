"""Exact stop strings for SGLang in token-in mode: pure, no SGLang import.

SGLang matches stop strings only with its own tokenizer, which token-in mode turns off. The design
this project follows converted each stop string to the *last token of its encoding* and stopped on
that id, which stops too early when that token also occurs elsewhere, and never stops when the
model spells the string with other tokens. Instead, a request with stop strings is streamed: every
new token goes through :class:`~skyrl_backends.stopping.StopStringMatcher` (the canonical semantics
shared with the other backends), the request is aborted at the first match, and the tokens the
engine produced after the match (between the match and the abort taking effect) are trimmed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from skyrl_backends.stopping import StopStringMatcher


@dataclass(frozen=True)
class StopMatch:
    """Where a response stops: keep ``num_tokens`` tokens; ``stop`` is the matched string (``text``
    ends with it) or stop token id."""

    num_tokens: int
    stop: str | int
    text: str


class StopStringWatch:
    """Follows one streamed response (cumulative token lists) and reports the first match.

    ``stop_token_ids`` are watched too when given: SGLang's ``ignore_eos`` also disables its stop
    ids, while canonically it only disables EOS, so with ``ignore_eos`` the plugin watches them."""

    def __init__(self, stop: Sequence[str], decode: Callable[[list[int]], str],
                 stop_token_ids: Sequence[int] = ()) -> None:
        self._matcher = StopStringMatcher(stop, decode)
        self._decode = decode
        self._stop_ids = frozenset(int(t) for t in stop_token_ids)
        self._tokens: list[int] = []
        self.match: StopMatch | None = None

    def feed(self, output_ids: Sequence[int]) -> StopMatch | None:
        """Feed the response so far; returns the match once one is found (and from then on)."""
        if self.match is not None or not (self._matcher or self._stop_ids):
            return self.match
        if len(output_ids) < len(self._tokens) or list(output_ids[: len(self._tokens)]) != self._tokens:
            raise ValueError("streamed output is not an extension of the tokens seen so far")
        for token in output_ids[len(self._tokens):]:
            self._tokens.append(int(token))
            if int(token) in self._stop_ids:
                self.match = StopMatch(len(self._tokens), int(token), self._decode(self._tokens))
                break
            found = self._matcher.feed(self._tokens) if self._matcher else None
            if found is not None:
                self.match = StopMatch(len(self._tokens), found[0], found[1])
                break
        return self.match
