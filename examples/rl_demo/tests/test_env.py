import random

import pytest

from skyrl_rl_demo.env import SayTheDigitEnv, sample_targets, score_answer


@pytest.mark.parametrize("answer, score", [
    ("7", 1.0), (" 7\n", 1.0), ("7x", 0.5), ("a 7 b", 0.5), ("3", 0.1), ("", 0.0), ("seven", 0.0), ("33", 0.0),
])
def test_score_answer(answer, score):
    assert score_answer(answer, "7") == score


def test_two_turn_episode_feedback_and_rewards():
    env = SayTheDigitEnv([7, 3])
    assert env.init([]) == [{"role": "user", "content": "Say 7."}]
    first = env.step("7")
    assert (first.reward, first.done) == (0.5, False)
    assert first.observation == [{"role": "user", "content": "Correct. Now say 3."}]
    second = env.step("nope")
    assert (second.reward, second.done, second.observation) == (0.0, True, [])
    assert first.reward + second.reward == 0.5  # the return: mean score over turns
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("3")


def test_wrong_answer_feedback_and_history_is_kept():
    env = SayTheDigitEnv([1, 2])
    history = [{"role": "system", "content": "Be brief."}]
    assert env.init(history)[0] == history[0]
    assert env.step("5").observation[0]["content"] == "Wrong. Now say 2."


def test_targets_validated_and_sampled_without_repeats():
    with pytest.raises(ValueError, match="digits 0-9"):
        SayTheDigitEnv([12])
    rng = random.Random(0)
    for _ in range(200):
        a, b = sample_targets(rng, 2)
        assert a != b and 0 <= a <= 9 and 0 <= b <= 9
