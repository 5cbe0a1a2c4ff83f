"""The plugin's logit processor: min_new_tokens masking and seeded sampling (pure torch).

SGLang's request object is stood in for by a small test double carrying the two attributes the
processor reads (``output_ids``, ``inflight_middle_chunks``); the real engine runs it in
tests/cpu."""

import math
from types import SimpleNamespace

import torch

from skyrl_backend_sglang.logit_processor import (
    SkyRLLogitProcessor,
    banned_until_min_length,
    apply_repetition_penalty,
    request_step,
    seeded_choice,
    step_seed,
    truncated_logits,
)

SEEDED = {"self_sample": True, "seed": 5, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}


def test_min_length_masks_eos_and_stop_ids_until_reached():
    params = {"min_new_tokens": 2, "stop_token_ids": [3], "eos_token_ids": [1], "ignore_eos": False}
    processor = SkyRLLogitProcessor()
    for step, masked in [(0, True), (1, True), (2, False)]:
        logits = torch.zeros(1, 6)
        processor(logits, [dict(params, step=step)])
        assert (logits[0, [1, 3]] == -math.inf).all() == masked
        assert (logits[0, [0, 2, 4, 5]] == 0).all()


def test_ignore_eos_leaves_eos_alone():
    assert banned_until_min_length({"stop_token_ids": [3], "eos_token_ids": [1], "ignore_eos": True}) == [3]
    assert banned_until_min_length({"stop_token_ids": [3], "eos_token_ids": [1]}) == [1, 3]


def test_seeded_rows_become_one_hot_and_reproduce_whatever_the_batch():
    torch.manual_seed(0)
    row = torch.randn(50)
    alone = torch.stack([row.clone()])
    batch = torch.stack([torch.randn(50), row.clone(), torch.randn(50)])
    processor = SkyRLLogitProcessor()
    processor(alone, [dict(SEEDED, step=4)])
    processor(batch, [None, dict(SEEDED, step=4), {}])
    chosen = int(alone[0].argmax())
    assert alone[0, chosen] == 0 and torch.isinf(alone[0]).sum() == 49
    assert torch.equal(batch[1], alone[0])
    assert not torch.isinf(batch[0]).any() and not torch.isinf(batch[2]).any()


def test_seeded_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    draws = [seeded_choice(logits, seed, 0, 1.0, -1, 1.0, 0.0) for seed in range(3000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert abs(freq[0] - 0.6) < 0.04 and abs(freq[1] - 0.3) < 0.04 and abs(freq[2] - 0.1) < 0.03


def test_steps_and_seeds_give_different_streams():
    assert len({step_seed(1, s) for s in range(100)}) == 100
    assert step_seed(1, 2) != step_seed(2, 1)


def test_truncation_order():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(truncated_logits(logits, 1.0, 2, 1.0, 0.0)).tolist() == [False, False, True, True]
    assert torch.isinf(truncated_logits(logits, 1.0, -1, 0.7, 0.0)).tolist() == [False, False, True, True]
    assert torch.isinf(truncated_logits(logits, 1.0, -1, 1.0, 0.2)).tolist() == [False, False, False, True]
    assert truncated_logits(logits, 1.0, -1, 0.01, 0.0).isfinite().sum() == 1  # the top token always stays


def test_step_counts_calls_on_the_request_and_skips_middle_chunks():
    req = SimpleNamespace(output_ids=[], inflight_middle_chunks=1)
    assert request_step({"__req__": req}) is None  # this token is thrown away by SGLang
    req.inflight_middle_chunks = 0
    assert [request_step({"__req__": req}) for _ in range(3)] == [0, 1, 2]
    # Under the overlap scheduler output_ids lags; the processor's own count does not.
    late = SimpleNamespace(output_ids=[7, 8], inflight_middle_chunks=0)
    assert request_step({"__req__": late}) == 2
    late.output_ids.append(9)
    assert request_step({"__req__": late}) == 3


def test_repetition_penalty_covers_prompt_and_response_once():
    row = torch.tensor([2.0, -2.0, 4.0, 1.0])
    apply_repetition_penalty(row, [0, 1, 1, 3], 2.0)
    assert row.tolist() == [1.0, -4.0, 4.0, 0.5]


def test_self_sampling_penalises_the_exact_history_despite_lagging_output_ids():
    # The prompt holds token 1, the processor itself chose token 2 at the previous step, and SGLang's
    # output_ids have not caught up: both must be penalised, so greedy now picks token 3.
    params = {"self_sample": True, "seed": None, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
              "repetition_penalty": 10.0}
    req = SimpleNamespace(origin_input_ids=[1], output_ids=[], inflight_middle_chunks=0)
    processor = SkyRLLogitProcessor()
    first = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    processor(first, [dict(params, __req__=req)])
    assert int(first[0].argmax()) == 2  # 5/10 < 4: the prompt token is penalised
    second = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    processor(second, [dict(params, __req__=req)])
    assert int(second[0].argmax()) == 3
