"""Prefix caching: cached prefixes never change results, and never survive a weight update."""

from __future__ import annotations

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.conformance.suite.weight_sync import PERTURBED, perturbed


class PrefixCacheTests(ConformanceTestBase):
    feature_row = "Prefix cache"

    @requires(capabilities.PREFIX_CACHING)
    def test_shared_prefixes_give_reference_output(self, conformance: ConformanceHarness) -> None:
        stem = conformance.reference.prompts(1, seed=81, min_len=24, max_len=24)[0]
        prompts = [stem + tail for tail in conformance.reference.prompts(4, seed=82, min_len=1, max_len=6)]
        for _ in range(2):  # the second round runs from cached prefixes
            for prompt in prompts:
                conformance.assert_greedy_parity(prompt, conformance.greedy([prompt], 8)[0], 8)
        conformance.run(conformance.engine.reset_prefix_cache())
        for prompt in prompts:
            conformance.assert_greedy_parity(prompt, conformance.greedy([prompt], 8)[0], 8)

    @requires(capabilities.PREFIX_CACHING, capabilities.weight_sync("tensors"))
    def test_weight_update_invalidates_cache(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=83, min_len=30, max_len=30)[0]
        original = conformance.greedy([prompt], 8)[0]  # fills the cache with the original weights' KV
        conformance.push_weights(perturbed(conformance))
        try:
            c = conformance.greedy([prompt], 8)[0]
            conformance.assert_greedy_parity(prompt, c, 8, weights=PERTURBED)
        finally:
            conformance.push_weights(conformance.reference.original_state)
        assert conformance.greedy([prompt], 8)[0].token_ids == original.token_ids
