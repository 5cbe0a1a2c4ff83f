"""Log-probabilities out of SGLang's ``meta_info``: pure functions, no SGLang import.

SGLang reports one entry per token as a ``(logprob, token_id, text)`` tuple (``text`` is None in
token-in mode) under ``output_token_logprobs``, and per position a list of such tuples under
``output_top_logprobs``. Prompt-side entries (``input_token_logprobs``) have the same shape; the
first prompt token has no log-probability (``None``). Older releases gave bare floats; both are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def entry_logprob(entry: Any) -> float | None:
    """The log-probability of one entry: a ``(logprob, token_id, text)`` tuple or a bare number."""
    if isinstance(entry, (list, tuple)):
        entry = entry[0] if entry else None
    return None if entry is None else float(entry)


def entry_token(entry: Any) -> int | None:
    if isinstance(entry, (list, tuple)) and len(entry) > 1 and entry[1] is not None:
        return int(entry[1])
    return None


def token_logprobs(entries: Sequence[Any] | None, token_ids: Sequence[int]) -> list[float]:
    """The chosen tokens' log-probabilities, one per token id; checks that the entries are of those
    tokens, since a misaligned list would silently train on wrong numbers."""
    entries = list(entries or [])
    if len(entries) < len(token_ids):
        raise ValueError(f"SGLang returned {len(entries)} log-probabilities for {len(token_ids)} tokens")
    values = []
    for i, (entry, token) in enumerate(zip(entries, token_ids)):
        reported = entry_token(entry)
        if reported is not None and reported != token:
            raise ValueError(f"log-probability {i} is of token {reported}, but token {token} was generated")
        value = entry_logprob(entry)
        if value is None:
            raise ValueError(f"SGLang returned no log-probability for token {i} ({token})")
        values.append(value)
    return values


def top_logprobs(entries: Sequence[Any] | None, count: int, num: int) -> list[dict[int, float]]:
    """Per position, the top ``num`` token ids and their log-probabilities (``count`` positions)."""
    entries = list(entries or [])
    if len(entries) < count:
        raise ValueError(f"SGLang returned top log-probabilities for {len(entries)} of {count} positions")
    result = []
    for position in entries[:count]:
        top: dict[int, float] = {}
        for entry in (position or [])[:num]:
            token, value = entry_token(entry), entry_logprob(entry)
            if token is not None and value is not None:
                top[token] = value
        result.append(top)
    return result


def from_output(meta_info: dict[str, Any], token_ids: Sequence[int], top_num: int
                ) -> tuple[list[float], list[dict[int, float]] | None]:
    """Log-probabilities of a generation's tokens (and top ``top_num`` when > 0)."""
    chosen = token_logprobs(meta_info.get("output_token_logprobs"), token_ids)
    top = top_logprobs(meta_info.get("output_top_logprobs"), len(token_ids), top_num) if top_num else None
    return chosen, top


def from_prefill(meta_info: dict[str, Any], token_ids: Sequence[int], top_num: int
                 ) -> tuple[list[float], list[dict[int, float]] | None]:
    """Log-probabilities of ``token_ids`` when they were fed as the *end of a prompt* (teacher
    forcing) with ``logprob_start_len`` at their first position: the last ``len(token_ids)`` prompt
    entries are theirs."""
    n = len(token_ids)
    entries = list(meta_info.get("input_token_logprobs") or [])
    if len(entries) < n:
        raise ValueError(f"SGLang returned {len(entries)} prompt log-probabilities for {n} rescored tokens")
    chosen = token_logprobs(entries[len(entries) - n:], token_ids)
    top = None
    if top_num:
        tops = list(meta_info.get("input_top_logprobs") or [])
        top = top_logprobs(tops[len(tops) - n:], n, top_num)
    return chosen, top
