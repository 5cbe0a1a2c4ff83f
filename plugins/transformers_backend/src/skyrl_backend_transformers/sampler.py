"""Turning a step's logits into the next token of each sequence, and its log-probabilities.

Log-probabilities are taken from the raw logits (before repetition penalty, temperature and
truncation), so they equal a teacher-forced forward pass of the same weights; this is what an RL
trainer's importance ratio needs and what vLLM reports by default.
"""

from __future__ import annotations

import torch

from skyrl_backends.sampling import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalty: float) -> torch.Tensor:
    """HF/vLLM-style: divide positive logits of already-seen tokens by ``penalty``, multiply negative."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(seen):
        if not tokens:
            continue
        idx = torch.tensor(sorted(set(tokens)), device=logits.device)
        values = logits[row, idx]
        logits[row, idx] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (vLLM's order); masked entries become -inf."""
    logits = logits / params.temperature
    if params.top_k != -1 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        remove_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * params.min_p
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax when greedy, else a draw from the truncated distribution, each row
    from its own generator so a seeded sequence does not depend on the rest of the batch."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(truncate(logits.float(), params), dim=-1)
    chosen = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for row, generator in enumerate(generators):
        chosen[row] = torch.multinomial(probs[row], 1, generator=generator)[0]
    return chosen


def token_logprobs(raw_logits: torch.Tensor, chosen: torch.Tensor,
                   top_n: int) -> tuple[list[float], list[dict[int, float]] | None]:
    """The chosen tokens' log-probabilities and, when ``top_n`` > 0, each row's top-n alternatives."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen_lp = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
    if top_n <= 0:
        return chosen_lp, None
    values, indices = torch.topk(logprobs, top_n, dim=-1)
    top = [dict(zip(idx, val)) for idx, val in zip(indices.tolist(), values.tolist())]
    return chosen_lp, top
