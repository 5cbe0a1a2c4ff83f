"""The agent loop's bookkeeping: input ids, per-turn loss masks, rollout log-probabilities.

The first tests drive the loop with a scripted test double (it replays fixed completions) to pin
each case of the loss mask; the last one runs it on the real transformers engine."""

import asyncio

import pytest

from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, GenerateOutput
from skyrl_rl_demo.agent_loop import ChatTokens, TurnOutput, run_agent_loops
from skyrl_rl_demo.env import SayTheDigitEnv


class ScriptedGenerator:
    """Test double: replays one scripted completion per prompt per call and records the prompts."""

    def __init__(self, script):
        self.script = list(script)
        self.prompts = []
        self.session_ids = []

    async def generate(self, prompts, sampling_params=None, session_ids=None):
        self.prompts.append([list(p) for p in prompts])
        self.session_ids.append(session_ids)
        return GenerateOutput([self.script.pop(0) for _ in prompts])


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_turn_loss_mask_masks_an_appended_end_of_turn_and_observations():
    turn = TurnOutput(output_ids=[5, 6, 4], output_logprobs=[-0.5, -0.6, 0.0], added_eos=True, obs_ids=[7, 8],
                      reward=0.0, finish_reason="length")
    assert turn.get_turn_loss_mask() == [1, 1, 0, 0, 0]
    assert turn.get_turn_rollout_logprobs() == [-0.5, -0.6, 0.0, 0.0, 0.0]
    assert turn.num_generated == 2
    kept = TurnOutput([5, 4], [-0.5, -0.7], False, [], 1.0, "stop")
    assert kept.get_turn_loss_mask() == [1, 1]


def test_observation_ids_continue_the_chat_template_token_for_token(tokenizer):
    chat = ChatTokens(tokenizer)
    conversation = [{"role": "user", "content": "Say 7."}, {"role": "assistant", "content": "7"},
                    {"role": "user", "content": "Correct. Say 3."}]
    by_turns = (chat.prompt_ids(conversation[:1]) + ids(tokenizer, "7") + [chat.end_of_turn_id]
                + chat.observation_ids(conversation[2:]))
    whole = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(by_turns) == whole
    assert by_turns == ids(tokenizer, whole)


def test_loss_mask_logprobs_and_input_ids_over_two_turns(tokenizer):
    chat = ChatTokens(tokenizer)
    eot, eos = chat.end_of_turn_id, tokenizer.eos_token_id
    seven, three, junk = ids(tokenizer, "7"), ids(tokenizer, "3"), ids(tokenizer, "ab")
    script = [
        # episode 0: stops with the end-of-turn token (kept, trained on), then is cut by the length limit
        Completion(seven + [eot], "stop", logprobs=[-0.1, -0.2]),
        # episode 1: cut by the length limit (end-of-turn appended and masked), then ends with EOS
        Completion(junk, "length", logprobs=[-1.0] * len(junk)),
        Completion(three + junk, "length", logprobs=[-0.3] + [-0.4] * len(junk)),
        Completion(three + [eos], "stop", logprobs=[-0.5, -0.6]),
    ]
    generator = ScriptedGenerator(script)
    envs = [SayTheDigitEnv([7, 3]), SayTheDigitEnv([7, 3])]
    batch = asyncio.run(run_agent_loops(generator, envs, chat, SamplingParams(logprobs=0, max_generate_length=8)))
    first, second = batch.states

    obs_ok = chat.observation_ids([{"role": "user", "content": "Correct. Say 3."}])
    obs_wrong = chat.observation_ids([{"role": "user", "content": "Wrong. Say 3."}])
    assert first.response_ids == seven + [eot] + obs_ok + three + junk + [eot]
    assert first.loss_mask == [1] * 2 + [0] * len(obs_ok) + [1] * (1 + len(junk)) + [0]
    assert first.rollout_logprobs == [-0.1, -0.2] + [0.0] * len(obs_ok) + [-0.3] + [-0.4] * len(junk) + [0.0]
    assert second.response_ids == junk + [eot] + obs_wrong + three + [eos, eot]
    assert second.loss_mask == [1] * len(junk) + [0] + [0] * len(obs_wrong) + [1, 1, 0]
    assert [t.added_eos for t in first.turns] == [False, True] and [t.added_eos for t in second.turns] == [True, True]
    # every turn's prompt is the previous turn's prompt plus exactly the tokens in between
    assert generator.prompts[1] == [first.prompt_ids + seven + [eot] + obs_ok,
                                    second.prompt_ids + junk + [eot] + obs_wrong]
    assert first.input_ids == first.prompt_ids + first.response_ids
    # both turns of an episode carry its session id (sticky routing), distinct between episodes
    assert generator.session_ids[0] == generator.session_ids[1] == [first.session_id, second.session_id]
    assert first.session_id != second.session_id
    assert (first.total_reward, second.total_reward) == (0.75, 0.5)  # 7 right, "3ab" half; "ab" wrong, 3 right
    assert first.chat_history[-2:] == [{"role": "user", "content": "Correct. Say 3."},
                                       {"role": "assistant", "content": "3ab"}]
    assert batch.generated_tokens == 2 + len(junk) + 1 + len(junk) + 2


def test_missing_logprobs_are_refused(tokenizer):
    chat = ChatTokens(tokenizer)
    with pytest.raises(ValueError, match="logprobs"):
        asyncio.run(run_agent_loops(ScriptedGenerator([]), [SayTheDigitEnv([1, 2])], chat, SamplingParams()))
    generator = ScriptedGenerator([Completion([5, 6], "length", logprobs=None)])
    with pytest.raises(RuntimeError, match="log-probabilities"):
        asyncio.run(run_agent_loops(generator, [SayTheDigitEnv([1, 2])], chat, SamplingParams(logprobs=0)))


def test_real_engine_rollout_masks_every_token_by_who_produced_it(model_dir, tokenizer):
    import skyrl_backends as sb

    chat = ChatTokens(tokenizer)
    engine = sb.create_engine("transformers", model=model_dir, dtype="float32", seed=3)
    envs = [SayTheDigitEnv([d, (d + 1) % 10]) for d in range(8)]
    params = SamplingParams(max_generate_length=3, temperature=1.0, logprobs=0)
    try:
        batch = asyncio.run(run_agent_loops(engine, envs, chat, params))
    finally:
        asyncio.run(engine.teardown())
    for state in batch.states:
        assert len(state.turns) == 2 and state.done
        assert len(state.loss_mask) == len(state.rollout_logprobs) == len(state.response_ids)
        position = 0
        for turn in state.turns:
            generated = turn.num_generated
            assert 1 <= generated <= 3
            assert turn.added_eos == (turn.finish_reason == "length" or turn.output_ids[generated - 1] != chat.end_of_turn_id)
            span = state.loss_mask[position:position + len(turn.output_ids) + len(turn.obs_ids)]
            assert span == [1] * generated + [0] * int(turn.added_eos) + [0] * len(turn.obs_ids)
            assert all(lp < 0 for lp in turn.output_logprobs[:generated])
            position += len(turn.output_ids) + len(turn.obs_ids)
        assert state.input_ids[-1] == chat.end_of_turn_id
        assert tokenizer.decode(state.prompt_ids) == tokenizer.apply_chat_template(
            state.chat_history[:1], add_generation_prompt=True, tokenize=False)
