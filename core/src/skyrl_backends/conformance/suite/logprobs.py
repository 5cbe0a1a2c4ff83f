"""Log-probabilities, checked against an independent teacher-forced float32 forward pass.

``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the model's raw distribution
(before temperature and truncation), so it must match the reference's log-softmax at that position
whatever the sampling parameters were, within the tolerance of the engine's dtype.
"""

from __future__ import annotations

import torch

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase, require_parameter
from skyrl_backends.types import Completion

# Half-precision engines round every logit, and at a few positions (a near tie inside attention, a
# large logit) the rounding moves a log-probability well past the typical error: on an H200, vLLM
# 0.26 in bfloat16 and Hugging Face's own bfloat16 forward pass on the same GPU both reached 0.3 nats
# at single positions, and 0.7 was seen once, while their mean error was 0.03-0.04 nats. So outside
# float32 a few positions (OUTLIER_SHARE of them, at least one) may exceed the tolerance, up to
# OUTLIER_FACTOR times it, and the mean must stay under MEAN_SHARE of it. Reporting processed
# log-probabilities (after temperature) instead of raw ones gave a mean error of 0.34-0.91 nats there,
# far outside. float32 engines get no outliers: every position must be within the tolerance.
OUTLIER_SHARE = 0.05
OUTLIER_FACTOR = 4.0
MEAN_SHARE = 0.4


class LogprobCheck:
    """Collects a test's log-probabilities against the reference and judges them together."""

    def __init__(self, conformance: ConformanceHarness) -> None:
        self.conformance = conformance
        self.tolerance = conformance.logprob_tolerance
        self.errors: list[tuple[float, str]] = []  # (|engine - reference|, where)

    def add(self, got: float, expected: float, where: str) -> None:
        self.errors.append((abs(got - expected), f"{where}: engine {got:.5f}, float32 reference {expected:.5f}"))

    def add_completion(self, prompt: list[int], c: Completion, *, weights: str = "original",
                       lora: str | None = None) -> torch.Tensor:
        """Adds every returned token's log-probability; returns the reference's log-softmax rows."""
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids), (
            f"expected one log-probability per token, got {None if c.logprobs is None else len(c.logprobs)} "
            f"for {len(c.token_ids)} tokens")
        reference = self.conformance.reference.teacher_forced_logprobs(prompt, c.token_ids, weights=weights, lora=lora)
        for i, (token, got) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            self.add(got, float(reference[i, token]), f"token {token} at position {i} of prompt {prompt[:6]}...")
        return reference

    def verify(self) -> None:
        if not self.errors:
            return
        dtype, tolerance = self.conformance.engine_dtype, self.tolerance
        worst, where = max(self.errors)
        if dtype == "float32":
            assert worst <= tolerance, f"log-probability of {where} (off by {worst:.5f}; tolerance {tolerance})"
            return
        over = [e for e in self.errors if e[0] > tolerance]
        allowed = max(1, int(OUTLIER_SHARE * len(self.errors)))
        mean = sum(e for e, _ in self.errors) / len(self.errors)
        assert worst <= OUTLIER_FACTOR * tolerance, (
            f"log-probability of {where}: off by {worst:.5f}, more than {OUTLIER_FACTOR} x the {dtype} tolerance "
            f"{tolerance}")
        assert len(over) <= allowed, (
            f"{len(over)} of {len(self.errors)} log-probabilities are more than {tolerance} off ({dtype}); at most "
            f"{allowed} may be (rounding outliers). Worst: {where}")
        assert mean <= MEAN_SHARE * tolerance, (
            f"mean log-probability error {mean:.4f} over {len(self.errors)} tokens exceeds {MEAN_SHARE * tolerance:.4f} "
            f"({dtype}): a systematic difference (processed instead of raw log-probabilities?), not rounding")


def assert_logprobs_match(conformance: ConformanceHarness, prompt: list[int], c: Completion, *,
                          weights: str = "original", lora: str | None = None) -> None:
    check = LogprobCheck(conformance)
    check.add_completion(prompt, c, weights=weights, lora=lora)
    check.verify()


class LogprobTests(ConformanceTestBase):
    feature_row = "Log-probabilities (chosen token)"

    def test_greedy_logprobs_match_reference(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(4, seed=31, min_len=1, max_len=30)
        out = conformance.greedy(prompts, 16, logprobs=0)
        check = LogprobCheck(conformance)
        for prompt, c in zip(prompts, out, strict=True):
            check.add_completion(prompt, c)
        check.verify()

    def test_sampled_logprobs_are_raw(self, conformance: ConformanceHarness) -> None:
        # Temperature and truncation shape the draw, not the reported log-probability.
        prompts = conformance.reference.prompts(3, seed=32)
        for params in ({"temperature": 1.0}, {"temperature": 0.5, "top_k": 20}, {"temperature": 1.3, "top_p": 0.9}):
            out = conformance.generate(prompts, {"max_generate_length": 12, "logprobs": 0, **params})
            check = LogprobCheck(conformance)
            for prompt, c in zip(prompts, out, strict=True):
                check.add_completion(prompt, c)
            check.verify()

    def test_logprobs_with_stop_and_length(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=33)[0]
        full = conformance.reference.greedy(prompt, 12, ignore_eos=True).token_ids
        c = conformance.greedy([prompt], 12, logprobs=0, stop_token_ids=[full[5]], ignore_eos=True)[0]
        assert len(c.logprobs or []) == len(c.token_ids), "one log-probability per returned token, stop included"
        assert_logprobs_match(conformance, prompt, c)

    @feature("Log-probabilities (top-N)")
    def test_top_logprobs(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "logprobs", {"max_generate_length": 2, "logprobs": 3}, capabilities.TOP_LOGPROBS)
        n = min(5, conformance.capabilities.max_top_logprobs)
        prompts = conformance.reference.prompts(2, seed=34)
        # Sampled at a temperature other than 1, so alternatives taken after temperature show.
        out = conformance.generate(prompts, {"max_generate_length": 8, "temperature": 0.7, "logprobs": n})
        check = LogprobCheck(conformance)
        for prompt, c in zip(prompts, out, strict=True):
            reference = check.add_completion(prompt, c)
            assert c.top_logprobs is not None and len(c.top_logprobs) == len(c.token_ids)
            for i, step in enumerate(c.top_logprobs):
                assert len(step) == n, f"position {i}: {len(step)} alternatives for logprobs={n}"
                ref_values, _ = torch.topk(reference[i], n)
                cutoff = float(ref_values[-1]) - check.tolerance
                for token, value in step.items():
                    check.add(value, float(reference[i, token]), f"top log-probability of token {token} at position {i}")
                    assert float(reference[i, token]) >= cutoff, (
                        f"position {i}: token {token} is not among the reference's top {n}")
        check.verify()

    @feature("Log-probabilities (top-N)")
    @requires(capabilities.TOP_LOGPROBS)
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
