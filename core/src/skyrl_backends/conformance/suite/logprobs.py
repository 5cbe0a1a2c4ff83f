"""Log-probabilities, checked against an independent teacher-forced float32 forward pass.

``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the model's raw distribution
(before temperature and truncation), so it must match the reference's log-softmax at that position
whatever the sampling parameters were, within the tolerance of the engine's dtype.
"""

from __future__ import annotations

import torch

from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase, require_parameter
from skyrl_backends.types import Completion


def assert_logprobs_match(conformance: ConformanceHarness, prompt: list[int], c: Completion, *,
                          weights: str = "original", lora: str | None = None) -> None:
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids), (
        f"expected one log-probability per token, got {None if c.logprobs is None else len(c.logprobs)} "
        f"for {len(c.token_ids)} tokens")
    reference = conformance.reference.teacher_forced_logprobs(prompt, c.token_ids, weights=weights, lora=lora)
    expected = reference.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
    got = torch.tensor(c.logprobs, dtype=torch.float32)
    error = (got - expected).abs()
    tolerance = conformance.logprob_tolerance
    worst = int(error.argmax())
    assert float(error.max()) <= tolerance, (
        f"log-probability of token {c.token_ids[worst]} at position {worst} is {float(got[worst]):.5f}; the "
        f"float32 teacher-forced reference says {float(expected[worst]):.5f} (tolerance for "
        f"{conformance.engine_dtype}: {tolerance})")


class LogprobTests(ConformanceTestBase):
    feature_row = "Log-probabilities (chosen token)"

    def test_greedy_logprobs_match_reference(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(4, seed=31, min_len=1, max_len=30)
        out = conformance.greedy(prompts, 16, logprobs=0)
        for prompt, c in zip(prompts, out, strict=True):
            assert_logprobs_match(conformance, prompt, c)

    def test_sampled_logprobs_are_raw(self, conformance: ConformanceHarness) -> None:
        # Temperature and truncation shape the draw, not the reported log-probability.
        prompts = conformance.reference.prompts(3, seed=32)
        for params in ({"temperature": 1.0}, {"temperature": 0.5, "top_k": 20}, {"temperature": 1.3, "top_p": 0.9}):
            out = conformance.generate(prompts, {"max_generate_length": 12, "logprobs": 0, **params})
            for prompt, c in zip(prompts, out, strict=True):
                assert_logprobs_match(conformance, prompt, c)

    def test_logprobs_with_stop_and_length(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=33)[0]
        full = conformance.reference.greedy(prompt, 12, ignore_eos=True).token_ids
        c = conformance.greedy([prompt], 12, logprobs=0, stop_token_ids=[full[5]], ignore_eos=True)[0]
        assert len(c.logprobs or []) == len(c.token_ids), "one log-probability per returned token, stop included"
        assert_logprobs_match(conformance, prompt, c)

    @feature("Log-probabilities (top-N)")
    def test_top_logprobs(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "top_logprobs", "logprobs", {"max_generate_length": 2, "logprobs": 3})
        n = min(5, conformance.capabilities.max_top_logprobs)
        prompts = conformance.reference.prompts(2, seed=34)
        out = conformance.generate(prompts, {"max_generate_length": 8, "temperature": 1.0, "logprobs": n})
        tolerance = conformance.logprob_tolerance
        for prompt, c in zip(prompts, out, strict=True):
            assert_logprobs_match(conformance, prompt, c)
            assert c.top_logprobs is not None and len(c.top_logprobs) == len(c.token_ids)
            reference = conformance.reference.teacher_forced_logprobs(prompt, c.token_ids)
            for i, step in enumerate(c.top_logprobs):
                assert len(step) == n, f"position {i}: {len(step)} alternatives for logprobs={n}"
                ref_values, _ = torch.topk(reference[i], n)
                cutoff = float(ref_values[-1]) - tolerance
                for token, value in step.items():
                    assert abs(value - float(reference[i, token])) <= tolerance, (
                        f"position {i}: top log-probability of token {token} is {value:.5f}, reference "
                        f"{float(reference[i, token]):.5f}")
                    assert float(reference[i, token]) >= cutoff, (
                        f"position {i}: token {token} is not among the reference's top {n}")

    @feature("Log-probabilities (top-N)")
    @requires("top_logprobs")
    def test_top_logprobs_limit(self, conformance: ConformanceHarness) -> None:
        from skyrl_backends.errors import SamplingParamsError

        limit = conformance.capabilities.max_top_logprobs
        prompt = conformance.reference.prompts(1, seed=35)[0]
        try:
            conformance.greedy([prompt], 2, logprobs=limit + 1)
        except SamplingParamsError as error:
            assert error.field == "logprobs"
        else:
            raise AssertionError(f"logprobs={limit + 1} exceeds the declared max_top_logprobs={limit} and must be "
                                 f"rejected")
        c = conformance.greedy([prompt], 2, logprobs=limit)[0]
        assert c.top_logprobs is not None and all(len(s) == limit for s in c.top_logprobs)
