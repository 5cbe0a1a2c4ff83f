"""The plugin's SGLang logit processor: ``min_new_tokens`` and reproducible seeded sampling.

SGLang in token-in mode rejects ``min_new_tokens`` (it wants a tokenizer for the EOS ids), and its
``sampling_seed`` only takes effect with server-wide deterministic inference, which also changes the
attention and sampling kernels and gives every unseeded request the same seed. Both are done here
instead, per request, by a custom logit processor SGLang runs in its scheduler process just before
sampling (after penalties):

* ``min_new_tokens``: until that many tokens were sampled, the EOS ids and stop ids get ``-inf``.
* ``seed`` and ``repetition_penalty``: the processor samples the token itself ("self-sampling")
  and makes the row one-hot, so SGLang's own sampler (run at temperature 1, without truncation or
  penalty, for such requests) can only pick that token. The token is drawn from the canonical
  distribution (repetition penalty over prompt *and* response, as Hugging Face and vLLM apply it;
  SGLang's own penalizes only the response; then temperature, top-k, top-p, min-p). A seeded draw
  uses a generator seeded from ``(seed, step)``, so it depends on nothing but the sequence's seed,
  step and logits and reproduces whatever else is in the batch. The processor keeps the tokens it
  chose on the request, so the penalty sees the exact history even when SGLang's own ``output_ids``
  lag behind (overlap scheduler).

Both change the distribution SGLang takes log-probabilities from, so the engine recomputes those
with a teacher-forced prefill (see ``translation.SGLangSampling.rescore_logprobs``).

This module imports torch only. SGLang loads the processor class by reference (dill) in its
scheduler processes, which import this module there; the class is duck-typed to SGLang's
``CustomLogitProcessor`` (a callable with ``to_str``), so nothing here imports SGLang.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch

_MASK64 = (1 << 64) - 1
# Attribute the processor keeps on SGLang's request object: how many tokens it has processed for it.
_STEP_ATTR = "_skyrl_backends_steps"
# ...and the tokens it chose for it (self-sampling), SGLang's output_ids may lag behind them.
_PICKED_ATTR = "_skyrl_backends_picked"


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, step)`` (splitmix64), so consecutive steps and
    neighbouring seeds draw unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def truncated_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row's logits after temperature, then top-k, top-p and min-p (the canonical order);
    removed entries become ``-inf``. The first-ranked token is always kept."""
    logits = logits.float() / temperature
    if top_k != -1 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < probs.max() * min_p, float("-inf"))
    return logits


def seeded_choice(logits: torch.Tensor, seed: int | None, step: int, temperature: float, top_k: int,
                  top_p: float, min_p: float) -> int:
    """The token a sequence takes at ``step`` (a row of logits in, a token id out): argmax at
    temperature 0, else a draw from the truncated distribution, reproducible when ``seed`` is set."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(truncated_logits(logits, temperature, top_k, top_p, min_p), dim=-1)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=probs.device)
        generator.manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def apply_repetition_penalty(row: torch.Tensor, history: list[int], penalty: float) -> None:
    """Hugging Face / vLLM semantics, in place: every token seen in prompt or response has a positive
    logit divided by ``penalty`` and a negative one multiplied by it (once, however often seen)."""
    if penalty == 1.0 or not history:
        return
    seen = torch.tensor(sorted(set(history)), device=row.device)
    values = row[seen]
    row[seen] = torch.where(values > 0, values / penalty, values * penalty)


def process_row(row: torch.Tensor, params: dict[str, Any], step: int, history: list[int] | None = None) -> int | None:
    """Apply the plugin's rules to one row of logits in place; ``step`` tokens were sampled so far and
    ``history`` is prompt plus response. Returns the token when the processor chose it."""
    if params.get("self_sample"):
        apply_repetition_penalty(row, history or [], float(params.get("repetition_penalty", 1.0)))
    minimum = int(params.get("min_new_tokens") or 0)
    if step < minimum:
        banned = banned_until_min_length(params)
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    if not params.get("self_sample"):
        return None
    seed = params.get("seed")
    token = seeded_choice(row, None if seed is None else int(seed), step, float(params["temperature"]),
                          int(params["top_k"]), float(params["top_p"]), float(params["min_p"]))
    row.fill_(float("-inf"))
    row[token] = 0.0
    return token


def banned_until_min_length(params: dict[str, Any]) -> list[int]:
    """The ids that may not end a sequence shorter than ``min_new_tokens``: its stop ids, and the
    EOS ids unless ``ignore_eos`` (then EOS cannot end it anyway)."""
    banned = set(_ints(params.get("stop_token_ids")))
    if not params.get("ignore_eos"):
        banned |= set(_ints(params.get("eos_token_ids")))
    return sorted(banned)


def _ints(values: Iterable[Any] | None) -> list[int]:
    return [int(v) for v in (values or [])]


def request_step(params: dict[str, Any]) -> int | None:
    """How many tokens this request has sampled before the current call, or None when this call's
    token will be discarded (a middle chunk of a chunked prefill).

    SGLang's request object (``__req__``) is the source. Its ``output_ids`` lag behind by one step
    under the overlap scheduler, so the processor counts its own calls on the request instead,
    starting from ``len(output_ids)`` the first time it sees the request."""
    req = params.get("__req__")
    if req is None:
        return int(params.get("step", 0))
    if getattr(req, "inflight_middle_chunks", 0) > 0:
        return None
    step = getattr(req, _STEP_ATTR, None)
    if step is None:
        step = len(getattr(req, "output_ids", ()) or ())
    setattr(req, _STEP_ATTR, step + 1)
    return step


def request_history(params: dict[str, Any]) -> list[int]:
    """Prompt plus the tokens this processor chose (self-sampling requests only)."""
    req = params.get("__req__")
    if req is None:
        return list(params.get("history", []))
    return [*getattr(req, "origin_input_ids", []), *getattr(req, _PICKED_ATTR, [])]


def record_choice(params: dict[str, Any], token: int) -> None:
    req = params.get("__req__")
    if req is not None:
        picked = getattr(req, _PICKED_ATTR, None)
        if picked is None:
            picked = list(getattr(req, "output_ids", []) or [])
            setattr(req, _PICKED_ATTR, picked)
        picked.append(token)


class SkyRLLogitProcessor:
    """SGLang custom logit processor (duck-typed ``CustomLogitProcessor``): rows are the requests
    that carry this processor, ``custom_param_list`` their ``custom_params``."""

    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        for row, params in enumerate(custom_param_list or []):
            if not params:
                continue
            step = request_step(params)
            if step is None:
                continue
            history = request_history(params) if params.get("self_sample") else None
            token = process_row(logits[row], params, step, history)
            if token is not None:
                record_choice(params, token)
        return logits

    @classmethod
    def to_str(cls) -> str:
        """SGLang's wire format: the class pickled with dill (by reference: the scheduler imports
        this module), hex-encoded in JSON."""
        import dill

        return json.dumps({"callable": dill.dumps(cls).hex()})
