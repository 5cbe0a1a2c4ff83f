"""vLLM's ``CompletionOutput`` -> a canonical :class:`~skyrl_backends.types.Completion`.

vLLM returns, per generated token, one dict of ``token id -> Logprob`` holding the chosen token and
the top N tokens (N or N+1 entries, since the chosen token may be among the top N). The canonical
form splits them: ``logprobs[i]`` is the chosen token's, ``top_logprobs[i]`` the top N by rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from skyrl_backends.types import Completion

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def split_logprobs(token_ids: Sequence[int], per_token: Sequence[Mapping[int, Any]] | None,
                   top_n: int | None) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    """``(chosen token logprobs, top-N dicts)``; either is None when not requested."""
    if top_n is None or per_token is None:
        return None, None
    chosen = [float(step[token].logprob) for token, step in zip(token_ids, per_token)]
    if not top_n:
        return chosen, None
    top = [{int(t): float(lp.logprob) for t, lp in step.items() if lp.rank is not None and lp.rank <= top_n}
           for step in per_token]
    return chosen, top


def to_completion(output: Any, request_id: str, top_n: int | None) -> Completion:
    """One canonical completion from a vLLM ``CompletionOutput`` (final or aborted)."""
    token_ids = list(output.token_ids)
    logprobs, top_logprobs = split_logprobs(token_ids, output.logprobs, top_n)
    finish = _FINISH_REASONS.get(output.finish_reason or "abort", "abort")
    return Completion(
        token_ids=token_ids,
        finish_reason=finish,  # type: ignore[arg-type]
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        text=output.text,
        stop_reason=output.stop_reason if finish == "stop" else None,
        request_id=request_id,
    )


def empty_aborted(request_id: str, top_n: int | None) -> Completion:
    """A request aborted before the engine produced anything."""
    return Completion(token_ids=[], finish_reason="abort", logprobs=[] if top_n is not None else None,
                      top_logprobs=[] if top_n else None, text="", request_id=request_id)
