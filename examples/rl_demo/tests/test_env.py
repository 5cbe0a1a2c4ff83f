import random

import pytest

from skyrl_rl_demo.env import SayTheDigitEnv, sample_targets, score_answer


@pytest.mark.parametrize("answer, score", [
    ("7", 1.0), (" 7\n", 1.0), ("7x", 0.5), ("3", 0.0), ("a 7 b", 0.5), ("", 0.0), ("seven", 0.0), ("33", 0.0),
])
def test_score_answer(answer, score):
    assert score_answer(answer, "7") == score


def test_two_turn_episode_feedback_and_rewards():
    env = SayTheDigitEnv([7, 3])
    assert env.init([]) == [{"role": "user", "content": "Say 7."}]
    first = env.step("7")
    assert (first.reward, first.done) == (0.5, False)
    assert first.observation == [{"role": "user", "content": "Correct. Say 3."}]
    second = env.step("nope")
    assert (second.reward, second.done, second.observation) == (0.0, True, [])
    assert first.reward + second.reward == 0.5  # the return: mean score over turns
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("3")


def test_wrong_answer_feedback_and_history_is_kept():
    env = SayTheDigitEnv([1, 2])
    history = [{"role": "system", "content": "Be brief."}]
    assert env.init(history)[0] == history[0]
    assert env.step("5").observation[0]["content"] == "Wrong. Say 2."


def test_targets_validated_and_each_episode_asks_one_digit_from_the_set():
    with pytest.raises(ValueError, match="digits 0-9"):
        SayTheDigitEnv([12])
    rng = random.Random(0)
    drawn = [sample_targets(rng, 2, [2, 5, 8]) for _ in range(300)]
    assert all(a == b for a, b in drawn)  # the second turn is a second chance at the same digit
    assert {a for a, _ in drawn} == {2, 5, 8}
