"""GRPO: group-normalised advantages and the clipped policy-gradient loss.

Each prompt is played ``group_size`` times; an episode's advantage is its return minus the mean of
its group, divided by the group's standard deviation, and applies to every token the policy
generated in it. The loss is PPO's clipped surrogate with the importance ratio taken against the
rollout log-probabilities, those the engine reported while sampling::

    ratio = exp(logprob_trainer - logprob_rollout)
    loss  = mean over generated tokens of  -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)

With one update per batch the trainer's weights equal the engine's, the ratio is 1 up to numerics,
and the loss is the plain policy gradient; the ratio is what keeps it correct when they differ
(several updates per batch, an engine in another precision, or an asynchronous trainer whose
rollouts were generated while it trained).

Stale tokens (asynchronous training). Every generated token carries the weight version that
produced it. Tokens are *weighted*, not dropped: the rollout log-probability of a token is the
probability it was actually sampled with, whichever weights (and, across an in-flight update,
whichever cache) produced it, so the clipped ratio above is the right off-policy weight for a token
one version behind as for a fresh one, and dropping those would discard the half of a rollout the
overlap generated. Only tokens more than ``max_staleness`` versions behind the policy being trained
are dropped from the loss (:func:`staleness_masks`): their ratios drift far from 1, where the clip
removes their gradient anyway while their noise remains. The asynchronous schedule keeps every token
within one version, so this is a safeguard that must stay at zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def group_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean(group)) / (std(group) + eps)`` for consecutive groups of ``group_size``."""
    if returns.ndim != 1 or returns.numel() % group_size:
        raise ValueError(f"expected a flat tensor whose length is a multiple of group_size={group_size}, "
                         f"got shape {tuple(returns.shape)}")
    grouped = returns.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + eps)).view(-1)


@dataclass
class PackedBatch:
    """Episodes as right-padded tensors. ``targets_mask``, ``rollout_logprobs`` are aligned with
    ``input_ids[:, 1:]`` (the token each position predicts)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    versions: torch.Tensor | None = None  # the weight version of each predicted token (-1: not generated)

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                           self.rollout_logprobs.to(device),
                           self.versions.to(device) if self.versions is not None else None)


def pack_episodes(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                  loss_masks: Sequence[Sequence[int]], rollout_logprobs: Sequence[Sequence[float]],
                  pad_token_id: int, versions: Sequence[Sequence[int]] | None = None) -> PackedBatch:
    """Concatenate prompt and response per episode, right-pad, and shift masks to prediction order
    (``versions``, one per response token, likewise)."""
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width - 1), dtype=torch.float32)
    old = torch.zeros((batch, width - 1), dtype=torch.float32)
    packed_versions = torch.full((batch, width - 1), -1, dtype=torch.long) if versions is not None else None
    for b, (prompt, row, mask, lps) in enumerate(zip(prompt_ids, rows, loss_masks, rollout_logprobs)):
        if not (len(mask) == len(lps) == len(row) - len(prompt)):
            raise ValueError(f"episode {b}: loss mask ({len(mask)}), rollout logprobs ({len(lps)}) and response "
                             f"({len(row) - len(prompt)}) must have one entry per response token")
        input_ids[b, :len(row)] = torch.tensor(row)
        attention[b, :len(row)] = 1
        # The token at position t is predicted at position t - 1.
        start = len(prompt) - 1
        loss_mask[b, start:start + len(mask)] = torch.tensor(mask, dtype=torch.float32)
        old[b, start:start + len(lps)] = torch.tensor(lps, dtype=torch.float32)
        if packed_versions is not None:
            episode_versions = list(versions[b])  # type: ignore[index]
            if len(episode_versions) != len(mask):
                raise ValueError(f"episode {b}: {len(episode_versions)} versions for {len(mask)} response tokens")
            packed_versions[b, start:start + len(mask)] = torch.tensor(episode_versions, dtype=torch.long)
    return PackedBatch(input_ids, attention, loss_mask, old, packed_versions)


@dataclass
class StalenessMasks:
    """Generated tokens by how far their version is behind the policy being trained."""

    on_policy: torch.Tensor  # version == policy version
    stale: torch.Tensor      # behind, within max_staleness: kept, weighted by the clipped ratio
    dropped: torch.Tensor    # more than max_staleness behind: out of the loss


def staleness_masks(versions: torch.Tensor, loss_mask: torch.Tensor, policy_version: int,
                    max_staleness: int) -> StalenessMasks:
    """Masks (float, like ``loss_mask``) of the tokens the loss sees, by staleness."""
    generated = loss_mask.bool() & (versions >= 0)
    lag = policy_version - versions
    return StalenessMasks(on_policy=(generated & (lag <= 0)).float(),
                          stale=(generated & (lag > 0) & (lag <= max_staleness)).float(),
                          dropped=(generated & (lag > max_staleness)).float())


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probability of each next token, shape ``[batch, seq - 1]``, and with
    ``with_entropy`` the entropy of each position's distribution (differentiable)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    all_logprobs = torch.log_softmax(logits, dim=-1)
    chosen = all_logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen
    entropy = -(all_logprobs.exp() * all_logprobs).sum(-1)
    return chosen, entropy


@dataclass
class LossStats:
    loss: float
    clip_fraction: float
    ratio_mean: float


def policy_loss(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor,
                loss_mask: torch.Tensor, clip_ratio: float = 0.2, entropy: torch.Tensor | None = None,
                entropy_coef: float = 0.0) -> tuple[torch.Tensor, LossStats]:
    """The clipped surrogate, averaged over the tokens where ``loss_mask`` is 1, minus
    ``entropy_coef`` times the mean entropy there (a bonus that keeps the policy exploring).

    ``advantages`` has one value per episode and applies to each of its generated tokens."""
    ratio = torch.exp(logprobs - rollout_logprobs)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * adv
    per_token = -torch.minimum(unclipped, clipped)
    tokens = loss_mask.sum().clamp(min=1.0)
    loss = (per_token * loss_mask).sum() / tokens
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (entropy * loss_mask).sum() / tokens
    with torch.no_grad():
        was_clipped = ((ratio - 1.0).abs() > clip_ratio).float()
        stats = LossStats(loss=float(loss), clip_fraction=float((was_clipped * loss_mask).sum() / tokens),
                          ratio_mean=float((ratio * loss_mask).sum() / tokens))
    return loss, stats
