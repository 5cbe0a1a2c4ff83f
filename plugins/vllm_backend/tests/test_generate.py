"""Generation on a real vLLM engine: token ids in and out, raw log-probabilities checked against an
independent teacher-forced forward pass, every canonical sampling parameter, abort, pause, prefix cache."""

from __future__ import annotations

import asyncio

import pytest

from conftest import GREEDY, PROMPTS


@pytest.fixture(scope="session")
def reference(model_dir: str):
    """The same checkpoint in HF transformers, float32: the oracle for log-probabilities."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(prompt: list[int], response: list[int]) -> "torch.Tensor":
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)

    return logprobs


async def test_greedy_generation_is_deterministic_and_exactly_as_long_as_asked(engine):
    first = await engine.generate(PROMPTS, {**GREEDY, "ignore_eos": True})
    again = await engine.generate(PROMPTS, {**GREEDY, "ignore_eos": True})
    assert first.response_ids == again.response_ids
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in first)
    assert len({tuple(ids) for ids in first.response_ids}) > 1  # different prompts, different outputs


async def test_logprobs_are_raw_and_match_a_teacher_forced_forward_pass(engine, reference):
    # Temperature and top-k change sampling, not the reported log-probabilities (raw logits).
    out = await engine.generate(PROMPTS, {"max_generate_length": 12, "temperature": 0.8, "top_k": 20,
                                          "logprobs": 3, "seed": 5, "ignore_eos": True})
    for prompt, c in zip(PROMPTS, out):
        expected = reference(prompt, c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) == 12
        for step, token in enumerate(c.token_ids):
            assert c.logprobs[step] == pytest.approx(float(expected[step, token]), abs=2e-3)
            top = expected[step].topk(3)
            assert set(c.top_logprobs[step]) == set(top.indices.tolist())
            for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert c.top_logprobs[step][tid] == pytest.approx(lp, abs=2e-3)


async def test_logprobs_zero_returns_the_chosen_token_only(engine):
    out = await engine.generate(PROMPTS[:1], {**GREEDY, "logprobs": 0})
    assert len(out[0].logprobs) == len(out[0].token_ids) and out[0].top_logprobs is None
    none = await engine.generate(PROMPTS[:1], GREEDY)
    assert none[0].logprobs is None and none[0].top_logprobs is None


async def test_stop_token_ids_end_the_sequence_with_that_token(engine):
    base = (await engine.generate(PROMPTS[:1], {**GREEDY, "ignore_eos": True}))[0].token_ids
    stop_at = base[5]
    first = base.index(stop_at)
    out = (await engine.generate(PROMPTS[:1], {**GREEDY, "stop_token_ids": [stop_at]}))[0]
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at


async def test_min_new_tokens_suppresses_stop_token_ids(engine):
    base = (await engine.generate(PROMPTS[:1], {**GREEDY, "ignore_eos": True}))[0].token_ids
    early = base[1]
    out = (await engine.generate(PROMPTS[:1], {**GREEDY, "stop_token_ids": [early], "min_new_tokens": 6,
                                               "ignore_eos": True}))[0]
    assert len(out.token_ids) >= 6
    assert early not in out.token_ids[:6]


async def test_stop_strings_include_the_string_and_end_on_the_completing_token(engine, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = (await engine.generate(PROMPTS[:1], {**GREEDY, "ignore_eos": True}))[0]
    # A stop string taken from the middle of the greedy text: two characters of token 6's text.
    text_upto = tokenizer.decode(base.token_ids[:7], skip_special_tokens=True)
    stop = next(text_upto[i:i + 2] for i in range(len(text_upto) - 2, 0, -1)
                if text_upto[i:i + 2].strip() and "\ufffd" not in text_upto[i:i + 2])
    out = (await engine.generate(PROMPTS[:1], {**GREEDY, "stop": [stop], "ignore_eos": True}))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text.endswith(stop) and out.text.count(stop) == 1
    assert out.token_ids == base.token_ids[:len(out.token_ids)]
    # The last token completes the match: without it the decoded text does not contain the string.
    assert stop in tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert stop not in tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)


async def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(engine):
    params = {"max_generate_length": 10, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = await engine.generate(PROMPTS[:1], params)
    batched = await engine.generate(PROMPTS, params)
    assert alone[0].token_ids == batched[0].token_ids
    other_seed = await engine.generate(PROMPTS[:1], {**params, "seed": 99})
    assert other_seed[0].token_ids != alone[0].token_ids


async def test_n_samples_per_prompt_are_ordered_prompt_major(engine):
    out = await engine.generate(PROMPTS[:2], {"max_generate_length": 6, "temperature": 1.0, "seed": 3, "n": 2,
                                              "ignore_eos": True})
    assert len(out) == 4
    assert out[0].token_ids != out[1].token_ids  # seeds 3 and 4
    single = await engine.generate(PROMPTS[1:2], {"max_generate_length": 6, "temperature": 1.0, "seed": 4,
                                                  "ignore_eos": True})
    assert out[3].token_ids == single[0].token_ids


async def test_sampling_filters_change_the_distribution(engine):
    base = {"max_generate_length": 24, "temperature": 1.5, "seed": 7, "ignore_eos": True}
    free = (await engine.generate(PROMPTS[:1], base))[0].token_ids
    top1 = (await engine.generate(PROMPTS[:1], {**base, "top_k": 1}))[0].token_ids
    greedy = (await engine.generate(PROMPTS[:1], {**GREEDY, "max_generate_length": 24, "ignore_eos": True}))[0].token_ids
    assert top1 == greedy and free != greedy
    min_p = (await engine.generate(PROMPTS[:1], {**base, "min_p": 1.0}))[0].token_ids
    assert min_p == greedy  # min_p = 1 keeps only the most likely token
    penalized = (await engine.generate(PROMPTS[:1], {**GREEDY, "max_generate_length": 24, "ignore_eos": True,
                                                     "repetition_penalty": 5.0}))[0].token_ids
    assert penalized != greedy


async def test_abort_returns_the_partial_output(engine):
    params = {"max_generate_length": 1000, "temperature": 1.0, "ignore_eos": True, "logprobs": 0}
    task = asyncio.create_task(engine.generate([PROMPTS[0], PROMPTS[1]], params, request_ids=["a-0", "a-1"]))
    await _wait_for_progress(engine, task)
    await engine.abort(["a-0"])
    await asyncio.sleep(0.3)
    await engine.abort()
    out = await task
    for c in out:
        assert c.finish_reason == "abort"
        assert 0 < len(c.token_ids) < 1000 and len(c.logprobs) == len(c.token_ids)
    assert engine.num_inflight == 0


async def test_abort_before_submission_returns_an_empty_aborted_completion(engine):
    await engine.impl.skyrl_backends_abort(["never-started"])
    out = await engine.generate(PROMPTS[:1], GREEDY, request_ids=["never-started"])
    assert out[0].finish_reason == "abort" and out[0].token_ids == []


async def test_pause_holds_requests_and_resume_continues_them(engine):
    params = {"max_generate_length": 300, "temperature": 1.0, "ignore_eos": True}
    task = asyncio.create_task(engine.generate(PROMPTS[:1], params))
    await _wait_for_progress(engine, task)
    await engine.pause_generation()
    await asyncio.sleep(1.0)
    assert not task.done()  # held, not finished and not aborted
    await engine.resume_generation()
    out = await task
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 300


async def test_abort_while_paused_returns_partial_output(engine):
    task = asyncio.create_task(engine.generate(PROMPTS[:1], {"max_generate_length": 1000, "temperature": 1.0,
                                                             "ignore_eos": True}))
    await _wait_for_progress(engine, task)
    await engine.pause_generation()
    try:
        await engine.abort()
        out = await asyncio.wait_for(task, 30)
    finally:
        await engine.resume_generation()
    assert out[0].finish_reason == "abort" and len(out[0].token_ids) < 1000


async def test_prefix_cache_reset_keeps_outputs_identical(engine):
    long_prompt = list(range(10, 200))
    first = await engine.generate([long_prompt], GREEDY)
    cached = await engine.generate([long_prompt], GREEDY)
    await engine.reset_prefix_cache()
    fresh = await engine.generate([long_prompt], GREEDY)
    assert first.response_ids == cached.response_ids == fresh.response_ids


async def test_bad_prompts_are_rejected_with_the_field_named(engine):
    from skyrl_backends.errors import ConfigError

    with pytest.raises(ConfigError, match=r"prompt_token_ids\[0\].*vocabulary"):
        await engine.generate([[1, 10_000]], GREEDY)
    with pytest.raises(ConfigError, match="max_model_len"):
        await engine.generate([[5] * 1100], GREEDY)


def _tokens_so_far(engine) -> dict[str, int]:
    """Tokens generated so far by each in-flight request, read from vLLM's output processor (requests
    ask for final output only, so nothing is streamed to look at). A test probe, not plugin code."""
    states = engine.impl._engine.output_processor.request_states.values()
    return {getattr(state, "external_req_id", None) or state.request_id: state.detokenizer.num_output_tokens()
            for state in states}


async def _wait_for_progress(engine, task: asyncio.Task, min_tokens: int = 3, timeout: float = 120.0) -> None:
    """Wait until every request of the plugin in flight has generated ``min_tokens`` (something to
    abort or pause). Requests in these tests ask for about as many tokens as the model allows, so
    they are still running then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert not task.done(), "the request finished before it could be interrupted"
        assert loop.time() < deadline, "the request never made progress"
        ids = set(engine.impl._inflight)
        counts = _tokens_so_far(engine)
        if ids and all(counts.get(rid, 0) >= min_tokens for rid in ids):
            return
        await asyncio.sleep(0.02)
