"""The plugin's SGLang logit processor: ``min_new_tokens`` and reproducible seeded sampling.

SGLang in token-in mode rejects ``min_new_tokens`` (it wants a tokenizer for the EOS ids), and its
``sampling_seed`` only takes effect with server-wide deterministic inference, which also changes the
attention and sampling kernels and gives every unseeded request the same seed. Both are done here
instead, per request, by a custom logit processor SGLang runs in its scheduler process just before
sampling (after penalties):

* ``min_new_tokens``: until that many tokens were sampled, the EOS ids and stop ids get ``-inf``.
* ``seed``: the next token is drawn from the canonical distribution (temperature, top-k, top-p,
  min-p) with a generator seeded from ``(seed, step)``, and the row is made one-hot so SGLang's own
  sampler (run at temperature 1 without truncation for such requests) can only pick that token. The
  draw depends on nothing but the sequence's seed, its step and its logits, so it reproduces
  whatever else is in the batch.

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


def seeded_choice(logits: torch.Tensor, seed: int, step: int, temperature: float, top_k: int,
                  top_p: float, min_p: float) -> int:
    """The token a seeded sequence takes at ``step`` (a row of logits in, a token id out)."""
    probs = torch.softmax(truncated_logits(logits, temperature, top_k, top_p, min_p), dim=-1)
    generator = torch.Generator(device=probs.device)
    generator.manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def process_row(row: torch.Tensor, params: dict[str, Any], step: int) -> None:
    """Apply the plugin's rules to one row of logits in place; ``step`` tokens were sampled so far."""
    minimum = int(params.get("min_new_tokens") or 0)
    if step < minimum:
        banned = banned_until_min_length(params)
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    seed = params.get("seed")
    if seed is not None:
        token = seeded_choice(row, int(seed), step, float(params["temperature"]), int(params["top_k"]),
                              float(params["top_p"]), float(params["min_p"]))
        row.fill_(float("-inf"))
        row[token] = 0.0


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


class SkyRLLogitProcessor:
    """SGLang custom logit processor (duck-typed ``CustomLogitProcessor``): rows are the requests
    that carry this processor, ``custom_param_list`` their ``custom_params``."""

    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        for row, params in enumerate(custom_param_list or []):
            if not params:
                continue
            step = request_step(params)
            if step is not None:
                process_row(logits[row], params, step)
        return logits

    @classmethod
    def to_str(cls) -> str:
        """SGLang's wire format: the class pickled with dill (by reference: the scheduler imports
        this module), hex-encoded in JSON."""
        import dill

        return json.dumps({"callable": dill.dumps(cls).hex()})
