"""Generation on the tiny model, checked against plain transformers (an oracle outside the backend)."""

import torch
from conftest import run

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [40]]
GREEDY = {"max_generate_length": 12, "temperature": 0, "ignore_eos": True}


def hf_greedy(hf_model, prompt, n):
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()


def teacher_forced_logprobs(hf_model, prompt, tokens):
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1)


def test_greedy_batch_equals_reference_decode_in_order(engine, hf_model):
    out = run(engine.generate(PROMPTS, GREEDY))
    assert out.response_ids == [hf_greedy(hf_model, p, 12) for p in PROMPTS]
    assert out.finish_reasons == ["length"] * 3


def test_logprobs_match_teacher_forced_pass(engine, hf_model):
    out = run(engine.generate(PROMPTS, {**GREEDY, "logprobs": 3}))
    for prompt, completion in zip(PROMPTS, out):
        reference = teacher_forced_logprobs(hf_model, prompt, completion.token_ids)
        chosen = reference.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(completion.logprobs), chosen, atol=1e-4)
        top = torch.topk(reference, 3, dim=-1)
        for step, alternatives in enumerate(completion.top_logprobs):
            assert list(alternatives) == top.indices[step].tolist()
            assert torch.allclose(torch.tensor(list(alternatives.values())), top.values[step], atol=1e-4)


def test_sampled_logprobs_are_raw_model_logprobs(engine, hf_model):
    out = run(engine.generate([PROMPTS[0]], {"max_generate_length": 8, "temperature": 0.7, "top_k": 5,
                                             "logprobs": 0, "seed": 1}))
    completion = out[0]
    reference = teacher_forced_logprobs(hf_model, PROMPTS[0], completion.token_ids)
    chosen = reference.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(completion.logprobs), chosen, atol=1e-4)
    assert completion.top_logprobs is None


def test_no_logprobs_unless_asked(engine):
    out = run(engine.generate([PROMPTS[0]], {"max_generate_length": 2}))
    assert out[0].logprobs is None and out[0].top_logprobs is None


def test_seeded_sampling_reproduces_whatever_the_batch(engine):
    params = {"max_generate_length": 10, "temperature": 1.0, "seed": 42}
    alone = run(engine.generate([PROMPTS[1]], params))
    batched = run(engine.generate([PROMPTS[0], PROMPTS[1]], params))
    assert alone[0].token_ids == batched[1].token_ids
    other_seed = run(engine.generate([PROMPTS[1]], {**params, "seed": 43}))
    assert other_seed[0].token_ids != alone[0].token_ids


def test_top_k_one_is_greedy(engine):
    greedy = run(engine.generate([PROMPTS[0]], GREEDY))
    top1 = run(engine.generate([PROMPTS[0]], {**GREEDY, "temperature": 1.0, "top_k": 1}))
    assert greedy.response_ids == top1.response_ids


def test_n_samples_per_prompt(engine):
    out = run(engine.generate([PROMPTS[0], PROMPTS[1]], {"max_generate_length": 4, "n": 3, "temperature": 0}))
    assert len(out) == 6
    assert out.response_ids[0] == out.response_ids[1] == out.response_ids[2]
    assert out.response_ids[3] == out.response_ids[4] == out.response_ids[5]


def test_text_is_decoded_response(engine):
    out = run(engine.generate([PROMPTS[0]], GREEDY))
    tokenizer = engine.impl.tokenizer
    assert out[0].text == tokenizer.decode(out[0].token_ids, skip_special_tokens=True)


def test_64_concurrent_generations_all_complete(engine, hf_model):
    import asyncio

    async def many():
        return await asyncio.gather(*(engine.generate([[i + 3]], {**GREEDY, "max_generate_length": 4})
                                      for i in range(64)))

    outputs = run(many())
    for i, out in enumerate(outputs[:8]):
        assert out.response_ids[0] == hf_greedy(hf_model, [i + 3], 4)
    assert all(len(o[0].token_ids) == 4 and o[0].finish_reason == "length" for o in outputs)
