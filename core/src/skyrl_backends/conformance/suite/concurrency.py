"""Concurrency: many generate calls in flight at once all complete, each with its own right answer."""

from __future__ import annotations

import asyncio

from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import requires
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
        for prompt, out in zip(prompts, outputs):
            assert len(out) == 1
            conformance.assert_greedy_parity(prompt, out[0], 8)
        assert engine.num_inflight == 0

    def test_one_large_batch(self, conformance: ConformanceHarness) -> None:
        count = conformance.config.concurrent_requests
        prompts = conformance.reference.prompts(count, seed=42, min_len=1, max_len=20)
        out = conformance.greedy(prompts, 8)
        assert len(out) == count
        for prompt, c in zip(prompts, out):
            conformance.assert_greedy_parity(prompt, c, 8)

    @requires("seeded_sampling")
    def test_mixed_parameters_concurrently(self, conformance: ConformanceHarness) -> None:
        # Requests with different parameters share the engine without leaking into each other.
        prompts = conformance.reference.prompts(8, seed=43)
        seeded = SamplingParams(max_generate_length=10, temperature=1.0, seed=7)
        alone = [conformance.generate([p], seeded)[0].token_ids for p in prompts]
        engine = conformance.engine

        async def mixed() -> list:
            calls = []
            for i, p in enumerate(prompts):
                calls.append(engine.generate([p], seeded))
                calls.append(engine.generate([p], SamplingParams(max_generate_length=10 - i % 3, temperature=0.0)))
            return await asyncio.gather(*calls)

        results = conformance.run(mixed())
        for i, p in enumerate(prompts):
            assert results[2 * i][0].token_ids == alone[i], f"prompt {i}: seeded sample changed under concurrency"
            conformance.assert_greedy_parity(p, results[2 * i + 1][0], 10 - i % 3)
