"""Caps on what one call of the Python API may ask for, so a mistaken or hostile request fails
with an error naming the limit instead of allocating without bound.

``n`` expands into that many sequences per prompt before any engine sees the request, and every
prompt becomes a sequence: both are capped. The defaults are far above what RL trainers send
(thousands of prompts, tens of samples each); raise them with the environment variables named
below (read when the check runs), or by assigning the module attributes.

The HTTP endpoint has its own, lower limits (``skyrl-backends serve --max-n ...``, see
:mod:`skyrl_backends.http.settings`).
"""

from __future__ import annotations

import os

MAX_N_ENV = "SKYRL_BACKENDS_MAX_N"
MAX_PROMPTS_ENV = "SKYRL_BACKENDS_MAX_PROMPTS_PER_REQUEST"

# Samples per prompt (SamplingParams.n).
MAX_N = 4096
# Prompts in one GenerateRequest.
MAX_PROMPTS_PER_REQUEST = 1_000_000


def max_n() -> int:
    return _from_env(MAX_N_ENV, MAX_N)


def max_prompts_per_request() -> int:
    return _from_env(MAX_PROMPTS_ENV, MAX_PROMPTS_PER_REQUEST)


def _from_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if parsed < 1:
        raise ValueError(f"{name} must be >= 1, got {parsed}")
    return parsed
