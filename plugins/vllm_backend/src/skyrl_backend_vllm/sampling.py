"""Canonical sampling parameters -> keyword arguments of ``vllm.SamplingParams``.

Pure (no vllm import), so the mapping is unit-tested without the engine. Every canonical field is
mapped; nothing is dropped:

=======================  ===============================================================
canonical                vLLM
=======================  ===============================================================
max_generate_length      max_tokens
min_new_tokens           min_tokens
top_k = -1 (disabled)    top_k = 0 (vLLM's "disabled")
logprobs = None / 0 / N  logprobs = None / 0 / N (vLLM returns the chosen token plus the
                         top N; :mod:`skyrl_backend_vllm.outputs` splits them apart)
stop                     stop, with include_stop_str_in_output=True so the text ends where the
                         stop string ends, as the canonical semantics require
stop_token_ids, seed,    same names
ignore_eos, temperature,
top_p, min_p,
repetition_penalty
n                        always 1: the facade expands n > 1 into separate requests
=======================  ===============================================================

Log-probabilities are raw (before temperature and truncation) because the engine is started with
``logprobs_mode="raw_logprobs"`` (see :mod:`skyrl_backend_vllm.options`).
"""

from __future__ import annotations

from typing import Any

from skyrl_backends.errors import SamplingParamsError
from skyrl_backends.sampling import SamplingParams

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default for the engine argument ``max_logprobs``


def translate(params: SamplingParams, max_logprobs: int = DEFAULT_MAX_LOGPROBS) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` keyword arguments for one canonical sample (``n`` is 1)."""
    if params.logprobs is not None and max_logprobs >= 0 and params.logprobs > max_logprobs:
        raise SamplingParamsError.out_of_range(
            "logprobs", params.logprobs,
            f"at most {max_logprobs} (the engine's max_logprobs; raise it with "
            f"engine_init_kwargs={{'max_logprobs': N}})")
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": params.max_generate_length,
        "min_tokens": params.min_new_tokens,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": 0 if params.top_k == -1 else params.top_k,
        "min_p": float(params.min_p),
        "repetition_penalty": float(params.repetition_penalty),
        "logprobs": params.logprobs,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "seed": params.seed,
        "skip_special_tokens": True,
    }
    if params.stop:
        kwargs["stop"] = list(params.stop)
        kwargs["include_stop_str_in_output"] = True
    return kwargs
