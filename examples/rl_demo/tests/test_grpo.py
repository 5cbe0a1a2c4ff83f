import math

import pytest
import torch

from skyrl_rl_demo.grpo import group_advantages, pack_episodes, policy_loss


def test_group_advantages_normalise_within_each_group():
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(returns, group_size=4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with one outcome teaches nothing
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.ones(6), group_size=4)


def test_policy_loss_is_the_policy_gradient_at_ratio_one_and_clips_beyond():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logprobs, logprobs.detach(), torch.tensor([2.0]), mask)
    assert math.isclose(stats.loss, -2.0) and stats.clip_fraction == 0.0 and math.isclose(stats.ratio_mean, 1.0)
    loss.backward()
    # d(loss)/d(logprob) = -A / (masked tokens) on masked tokens, 0 elsewhere
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.0, -1.0, 0.0]]))

    # ratio e^1 > 1.2 with a positive advantage: clipped, so no gradient flows
    new = torch.tensor([[0.0]], requires_grad=True)
    loss, stats = policy_loss(new, torch.tensor([[-1.0]]), torch.tensor([1.0]), torch.ones(1, 1), clip_ratio=0.2)
    loss.backward()
    assert math.isclose(stats.loss, -1.2, rel_tol=1e-6) and stats.clip_fraction == 1.0
    assert new.grad.abs().sum() == 0


def test_pack_episodes_aligns_masks_with_predicted_tokens():
    packed = pack_episodes(prompt_ids=[[10, 11], [10, 11, 12]], response_ids=[[20, 21, 22], [30]],
                           loss_masks=[[1, 0, 1], [1]], rollout_logprobs=[[-0.1, 0.0, -0.3], [-0.4]],
                           pad_token_id=0)
    assert packed.input_ids.tolist() == [[10, 11, 20, 21, 22], [10, 11, 12, 30, 0]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t + 1: response token j of an episode with prompt length p sits at p - 1 + j
    assert packed.loss_mask.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]
    assert torch.allclose(packed.rollout_logprobs, torch.tensor([[0, -0.1, 0, -0.3], [0, 0, -0.4, 0]]))
    with pytest.raises(ValueError, match="one entry per response token"):
        pack_episodes([[1]], [[2, 3]], [[1]], [[0.0, 0.0]], 0)
