"""The multi-turn agent loop of the design's Generation Flow, token in, token out.

For every episode::

    Environment.init(chat_history) -> prompt            (tokenized once, with the chat template)
    while not done:
        generate(input_ids)        -> output_ids, finish_reason, logprobs
        Environment.step(response) -> reward, observation, done
        AgentLoopState: accumulate input_ids, loss_mask, rollout_logprobs; update chat_history

The policy's tokens are never re-tokenized: the next turn's prompt is the previous prompt plus the
exact generated ids plus the observation's ids, so the trainer scores the very tokens the engine
sampled and the engine's log-probabilities line up with the trainer's.

Loss mask, per turn (the design's ``TurnOutput.get_turn_loss_mask``)::

    [1] * len(output_ids) + [0] * len(obs_ids)     and 0 for an end-of-turn token the loop appended

A response cut off by the length limit has no end-of-turn token; the loop appends one so the
conversation stays well formed, masks it (the policy did not choose it) and gives it log-probability
0.0 (never used, since it is masked).

Each generated token also keeps the weight version that produced it (``Completion.token_versions``):
an asynchronous trainer, whose weights move while rollouts run, tells fresh tokens from stale ones
by it. Tokens the policy did not generate have version ``NOT_GENERATED``.

Episodes run in lockstep: each turn sends every live episode's input ids in one ``generate`` call,
each with its episode's session id (sticky routing to one engine, for its prefix cache).
The engines batch within a call (the CPU reference engine batches only there), and the result is the
same as one loop per episode.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import GenerateOutput

from skyrl_rl_demo.env import Environment, Message

NOT_GENERATED = -1  # the version of a token the policy did not generate (observations, appended EOS)


class Generates(Protocol):
    """Anything with the engine's ``generate``: an InferenceEngine or the engine client."""

    async def generate(self, request: Any, sampling_params: Any = None, **fields: Any) -> GenerateOutput: ...


@dataclass
class TurnOutput:
    """One turn: the tokens the policy generated (plus an end-of-turn token the loop appended, if
    any), their log-probabilities, and the observation's tokens that follow them."""

    output_ids: list[int]
    output_logprobs: list[float]
    added_eos: bool
    obs_ids: list[int]
    reward: float
    finish_reason: str
    info: dict[str, Any] = field(default_factory=dict)
    output_versions: list[int] = field(default_factory=list)  # per output token (NOT_GENERATED if appended)

    def get_turn_loss_mask(self) -> list[int]:
        mask = [1] * len(self.output_ids) + [0] * len(self.obs_ids)
        if self.added_eos:
            mask[len(self.output_ids) - 1] = 0
        return mask

    def get_turn_rollout_logprobs(self) -> list[float]:
        return list(self.output_logprobs) + [0.0] * len(self.obs_ids)

    def get_turn_versions(self) -> list[int]:
        versions = list(self.output_versions) or [NOT_GENERATED] * len(self.output_ids)
        return versions + [NOT_GENERATED] * len(self.obs_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) - int(self.added_eos)


@dataclass
class AgentLoopState:
    """An episode as it grows. ``loss_mask`` and ``rollout_logprobs`` cover the response: every token
    after the initial prompt, generated or observed."""

    chat_history: list[Message]
    prompt_ids: list[int]
    input_ids: list[int]
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    loss_mask: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    rollout_versions: list[int] = field(default_factory=list)
    turns: list[TurnOutput] = field(default_factory=list)
    done: bool = False

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[len(self.prompt_ids):]

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.turns)

    def add_turn(self, turn: TurnOutput) -> None:
        self.input_ids.extend(turn.output_ids)
        self.input_ids.extend(turn.obs_ids)
        self.loss_mask.extend(turn.get_turn_loss_mask())
        self.rollout_logprobs.extend(turn.get_turn_rollout_logprobs())
        self.rollout_versions.extend(turn.get_turn_versions())
        self.turns.append(turn)


class ChatTokens:
    """The chat template, as token ids: a prompt's ids, and the ids of an observation that follows an
    assistant turn ending with the end-of-turn token."""

    def __init__(self, tokenizer: Any, end_of_turn: str = "<|im_end|>") -> None:
        self.tokenizer = tokenizer
        self.end_of_turn_text = end_of_turn
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no end-of-turn token {end_of_turn!r}; pass the one its chat "
                             "template closes messages with")

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return self._encode(self._render(messages, add_generation_prompt=True))

    def observation_ids(self, observation: Sequence[Message]) -> list[int]:
        """Ids of ``observation`` rendered after an assistant turn, up to the next assistant header.

        Rendered against a placeholder assistant turn and cut after its end-of-turn token, so that
        whatever the template puts after that token (a newline here) belongs to the observation."""
        base = [{"role": "assistant", "content": "x"}]
        base_text = self._render(base, add_generation_prompt=False)
        full_text = self._render(base + list(observation), add_generation_prompt=True)
        if not full_text.startswith(base_text):
            raise ValueError("the chat template renders earlier messages differently once more follow; "
                             "observations cannot be appended token by token")
        cut = base_text.rindex(self.end_of_turn_text) + len(self.end_of_turn_text)
        return self._encode(base_text[cut:] + full_text[len(base_text):])

    def response_text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


@dataclass
class RolloutBatch:
    """Finished episodes plus what generating them cost."""

    states: list[AgentLoopState]
    generation_s: float
    generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0


async def run_agent_loops(generator: Generates, envs: Sequence[Environment], chat: ChatTokens,
                          sampling_params: SamplingParams, max_turns: int = 8,
                          chat_histories: Sequence[list[Message]] | None = None) -> RolloutBatch:
    """Play every episode to the end (``done``, or ``max_turns``) and return their states."""
    if sampling_params.logprobs is None:
        raise ValueError("sampling_params.logprobs must be 0 or more: the trainer needs the rollout "
                         "log-probabilities for its importance ratio")
    if chat.end_of_turn_id not in sampling_params.stop_token_ids:
        sampling_params = sampling_params.replace(
            stop_token_ids=(*sampling_params.stop_token_ids, chat.end_of_turn_id))
    histories = chat_histories or [[] for _ in envs]
    states = []
    for env, history in zip(envs, histories):
        prompt = env.init(list(history))
        ids = chat.prompt_ids(prompt)
        states.append(AgentLoopState(chat_history=list(prompt), prompt_ids=list(ids), input_ids=list(ids)))
    generation_s = 0.0
    generated = 0
    for _ in range(max_turns):
        live = [i for i, s in enumerate(states) if not s.done]
        if not live:
            break
        started = time.perf_counter()
        # One session per episode: the client sends every turn of it to the same engine, whose
        # prefix cache then already holds the conversation so far.
        output = await generator.generate([states[i].input_ids for i in live], sampling_params,
                                          session_ids=[states[i].session_id for i in live])
        generation_s += time.perf_counter() - started
        for i, completion in zip(live, output):
            state, env = states[i], envs[i]
            output_ids = list(completion.token_ids)
            logprobs = list(completion.logprobs or [])
            if len(logprobs) != len(output_ids):
                raise RuntimeError(f"the engine returned {len(logprobs)} log-probabilities for "
                                   f"{len(output_ids)} tokens; the trainer needs one per token")
            generated += len(output_ids)
            versions = completion.token_versions.per_token() if completion.token_versions is not None \
                else [NOT_GENERATED] * len(output_ids)
            text = chat.response_text([t for t in output_ids if t != chat.end_of_turn_id])
            result = env.step(text)
            added_eos = not output_ids or output_ids[-1] != chat.end_of_turn_id
            if added_eos:
                output_ids.append(chat.end_of_turn_id)
                logprobs.append(0.0)
                versions.append(NOT_GENERATED)
            obs_ids = chat.observation_ids(result.observation) if not result.done else []
            state.add_turn(TurnOutput(output_ids, logprobs, added_eos, obs_ids, float(result.reward),
                                      completion.finish_reason, dict(result.info), versions))
            state.chat_history.append({"role": "assistant", "content": text})
            state.chat_history.extend(result.observation)
            state.done = result.done
    for state in states:
        state.done = True  # episodes still running after max_turns are cut there
    return RolloutBatch(states, generation_s, generated)
