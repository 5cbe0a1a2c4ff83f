"""The multi-turn environment interface, and the demo's task.

An environment is what the agent loop talks to, one conversation at a time (the design's
``Environment.init(chat_history) -> prompt`` and ``Environment.step(response) -> reward,
observation, done``). It sees text only; tokens are the agent loop's business.

The task, *say the digit*, gives the policy two tries::

    user:      Say 5.
    assistant: 8                      <- turn 1, scored against 5
    user:      Wrong. Say 5.          <- the observation: feedback on turn 1, and the request again
    assistant: 5                      <- turn 2, scored against 5; done

A turn scores 1.0 for exactly the requested digit, 0.5 for an answer containing it among other
text, else 0 (:func:`score_answer`). Each step's reward is the turn's score over the number of
turns, so an episode's return (the sum of its step rewards) is its mean score, in [0, 1].

A randomly initialised model says the requested digit about once in two hundred tries, so the
reward starts near 0. To score, the policy must first answer with digits at all, then read which
digit the user asked for out of the prompt (the environment checks nothing else).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]


@dataclass(frozen=True)
class StepResult:
    """What :meth:`Environment.step` returns: the turn's reward, the messages the environment adds
    to the conversation (empty when done), and whether the episode is over."""

    reward: float
    observation: list[Message]
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    """A multi-turn text environment, one instance per episode."""

    def init(self, chat_history: list[Message]) -> list[Message]:
        """Start the episode after ``chat_history`` (may be empty); return the prompt messages."""
        ...

    def step(self, response: str) -> StepResult:
        """Score the policy's response to the last prompt and say what comes next."""
        ...


def score_answer(response: str, target: str) -> float:
    """1.0 for exactly ``target``, 0.5 when ``target`` is in the answer among other text, else 0."""
    answer = response.strip()
    if answer == target:
        return 1.0
    if target in answer:
        return 0.5
    return 0.0


class SayTheDigitEnv:
    """The demo task: in each turn the user asks for one digit, the policy must answer with it."""

    def __init__(self, targets: Sequence[int]) -> None:
        if not targets or not all(isinstance(t, int) and 0 <= t <= 9 for t in targets):
            raise ValueError(f"targets must be a non-empty list of digits 0-9, got {list(targets)!r}")
        self.targets = [str(t) for t in targets]
        self.turn = 0
        self.scores: list[float] = []

    @property
    def max_turns(self) -> int:
        return len(self.targets)

    def init(self, chat_history: list[Message]) -> list[Message]:
        self.turn = 0
        self.scores = []
        return [*chat_history, {"role": "user", "content": f"Say {self.targets[0]}."}]

    def step(self, response: str) -> StepResult:
        if self.turn >= len(self.targets):
            raise RuntimeError("step() after the episode ended; call init() to start a new one")
        target = self.targets[self.turn]
        score = score_answer(response, target)
        self.scores.append(score)
        self.turn += 1
        info = {"target": target, "exact": score == 1.0}
        # Each turn pays its share, so the episode's return (the sum of its step rewards) is the mean
        # score over turns, in [0, 1].
        done = self.turn == len(self.targets)
        reward = score / len(self.targets)
        if done:
            return StepResult(reward, [], True, info)
        feedback = "Correct." if score == 1.0 else "Wrong."
        observation = [{"role": "user", "content": f"{feedback} Say {self.targets[self.turn]}."}]
        return StepResult(reward, observation, False, info)


def sample_targets(rng: random.Random, turns: int, digits: Sequence[int] = tuple(range(10))) -> list[int]:
    """Targets for one episode: one digit drawn from ``digits``, asked for in every turn (each turn
    after the first is a second chance, after feedback on the previous answer)."""
    return [rng.choice(list(digits))] * turns
