"""Concurrency: many generate calls in flight at once all complete, each with its own right answer."""

from __future__ import annotations

import asyncio

from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.sampling import SamplingParams


class ConcurrencyTests(ConformanceTestBase):
    feature_row = "Concurrency"

    def test_concurrent_generate_calls(self, conformance: ConformanceHarness) -> None:
        count = conformance.config.concurrent_requests
        prompts = conformance.reference.prompts(count, seed=41, min_len=1, max_len=20)
        params = SamplingParams(max_generate_length=8, temperature=0.0)
        engine = conformance.engine

        async def all_at_once() -> list:
            return await asyncio.gather(*(engine.generate([p], params) for p in prompts))

        outputs = conformance.run(all_at_once())
        assert len(outputs) == count
        for prompt, out in zip(prompts, outputs, strict=True):
            assert len(out) == 1
            conformance.assert_greedy_parity(prompt, out[0], 8)
        assert engine.num_inflight == 0

    def test_one_large_batch(self, conformance: ConformanceHarness) -> None:
        count = conformance.config.concurrent_requests
        prompts = conformance.reference.prompts(count, seed=42, min_len=1, max_len=20)
        out = conformance.greedy(prompts, 8)
        assert len(out) == count
        for prompt, c in zip(prompts, out, strict=True):
            conformance.assert_greedy_parity(prompt, c, 8)

    def test_mixed_parameters_concurrently(self, conformance: ConformanceHarness) -> None:
        # Requests with different parameters share the engine without leaking into each other:
        # greedy, top_k=1 sampling (also greedy), with and without log-probabilities, other lengths.
        prompts = conformance.reference.prompts(8, seed=43)
        engine = conformance.engine
        variants = [SamplingParams(max_generate_length=10 - i % 4, temperature=0.0 if i % 2 else 1.0,
                                   top_k=-1 if i % 2 else 1, logprobs=0 if i % 3 == 0 else None)
                    for i in range(len(prompts))]

        async def mixed() -> list:
            return await asyncio.gather(*(engine.generate([p], v) for p, v in zip(prompts, variants, strict=True)))

        for prompt, params, out in zip(prompts, variants, conformance.run(mixed()), strict=True):
            c = out[0]
            conformance.assert_greedy_parity(prompt, c, params.max_generate_length)
            assert (c.logprobs is not None) == (params.logprobs is not None), "logprobs leaked between requests"
