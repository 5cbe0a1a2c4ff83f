"""Sampling parameters: every canonical parameter is honoured, or rejected by name; never dropped.

Distributions are checked against the reference: the first token of many samples of one prompt,
drawn by the backend, must be distributed like the reference's processed distribution (total
variation distance well inside what sampling noise allows).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase, honoured_or_rejected, require_parameter
from skyrl_backends.errors import SamplingParamsError

SAMPLES = 512
# Distances are measured over the reference's 8 likeliest tokens plus one bin for the rest, where
# 512 draws give an expected distance of about 0.05; 0.12 leaves a wide margin for noise, and every
# check first proves it can see the difference a dropped parameter makes (>= 0.25).
BINS = 8
MAX_TV_DISTANCE = 0.12
MIN_DISCRIMINATION = 0.25
# ... and, for truncation (top_k, top_p, min_p), a backend that ignored it would draw tokens outside
# the truncated support with at least this probability (about 50 of 512 draws).
MIN_EXCLUDED_MASS = 0.1


def reference_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                           min_p: float = 0.0) -> torch.Tensor:
    """The canonical sampling distribution: temperature, then one truncation."""
    logits = logits.float() / temperature
    if top_k != -1:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits, -1)
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], -1) - probs[order]
        logits[order[before >= top_p]] = float("-inf")
    if min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < probs.max() * min_p, float("-inf"))
    return torch.softmax(logits, -1)


def tolerated_support(logits: torch.Tensor, tolerance: float, temperature: float = 1.0, top_k: int = -1,
                      top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The tokens an engine may sample under these parameters, allowing for its own rounding.

    A token the float32 reference puts just past a truncation boundary (the k-th probability, the
    top-p mass, the min-p threshold) can fall just inside it for an engine whose log-probabilities
    are ``tolerance`` nats off (bfloat16 logits move probabilities by a few percent), so each
    boundary is widened by that much. Tokens outside even the widened boundary must never be drawn.
    """
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    keep = torch.ones_like(logprobs, dtype=torch.bool)
    if top_k != -1:
        kth = torch.topk(logprobs, top_k).values[-1]
        keep &= logprobs >= kth - tolerance
    if top_p < 1.0:
        probs = torch.softmax(logprobs.masked_fill(~keep, float("-inf")), -1)
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], -1) - probs[order]
        keep[order[before >= min(1.0, top_p * math.exp(tolerance))]] = False
    if min_p > 0.0:
        keep &= logprobs >= logprobs.max() + math.log(min_p) - tolerance
    return keep


def binned_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance between p and q over q's BINS likeliest tokens plus the rest."""
    top = torch.topk(q, BINS).indices
    rest_p, rest_q = 1.0 - float(p[top].sum()), 1.0 - float(q[top].sum())
    return 0.5 * (float((p[top] - q[top]).abs().sum()) + abs(rest_p - rest_q))


def _discriminating_prompt(conformance: ConformanceHarness,
                           params: dict[str, Any]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A prompt whose first-token distribution under ``params`` is far from the one a backend that
    dropped them would sample (plain temperature 1), so the check can fail; with the reference's
    distribution and the tokens the engine may draw within its dtype's tolerance."""
    for prompt in conformance.reference.prompts(32, seed=11):
        logprobs = conformance.reference.teacher_forced_logprobs(prompt, [0])[0]
        expected = reference_distribution(logprobs, **params)
        plain = reference_distribution(logprobs)
        allowed = tolerated_support(logprobs, conformance.logprob_tolerance, **params)
        truncates = any(k in params for k in ("top_k", "top_p", "min_p"))
        # A truncating parameter, if dropped, must also put visible mass outside the widened support.
        if binned_distance(plain, expected) >= MIN_DISCRIMINATION and (
                not truncates or float(plain[~allowed].sum()) >= MIN_EXCLUDED_MASS):
            return prompt, expected, allowed
    raise AssertionError(f"suite self-check: no test prompt separates {params} from plain sampling")


class SamplingParamsTests(ConformanceTestBase):
    feature_row = "Sampling parameters"

    def _check_first_token_distribution(self, conformance: ConformanceHarness, **params: Any) -> None:
        """Draw the first token SAMPLES times and compare with the reference distribution."""
        prompt, expected, allowed = _discriminating_prompt(conformance, params)
        out = conformance.generate([prompt], {"max_generate_length": 1, "n": SAMPLES, "ignore_eos": True, **params})
        counts = torch.zeros_like(expected)
        for c in out:
            counts[c.token_ids[0]] += 1
        outside = [t for t in range(len(expected)) if counts[t] > 0 and not allowed[t]]
        assert not outside, (f"{params}: sampled tokens {outside[:10]} that the parameters exclude (even allowing "
                             f"{conformance.logprob_tolerance} nats for {conformance.engine_dtype} rounding)")
        distance = binned_distance(counts / counts.sum(), expected)
        assert distance < MAX_TV_DISTANCE, (
            f"{params}: the sampled first-token distribution is {distance:.3f} (total variation over the reference's "
            f"top {BINS} tokens) from the reference's; allowed {MAX_TV_DISTANCE}")

    @feature("Sampling: temperature, top_p, top_k")
    def test_temperature_distribution(self, conformance: ConformanceHarness) -> None:
        for temperature in (0.5, 1.6):
            self._check_first_token_distribution(conformance, temperature=temperature)

    @feature("Sampling: temperature, top_p, top_k")
    def test_tiny_temperature_is_greedy(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(3, seed=12)
        out = conformance.generate(prompts, {"max_generate_length": 8, "temperature": 1e-4})
        for prompt, c in zip(prompts, out, strict=True):
            margins = conformance.reference.greedy_margins(prompt, c.token_ids)
            assert max(margins) <= max(conformance.greedy_margin, 1e-3), (
                f"temperature=1e-4 should be (nearly) greedy; token margins {margins}")

    @feature("Sampling: temperature, top_p, top_k")
    def test_top_k(self, conformance: ConformanceHarness) -> None:
        with honoured_or_rejected("top_k"):
            self._check_first_token_distribution(conformance, top_k=3)
        prompts = conformance.reference.prompts(3, seed=13)
        out = conformance.generate(prompts, {"max_generate_length": 8, "top_k": 1, "temperature": 1.0})
        for prompt, c in zip(prompts, out, strict=True):
            conformance.assert_greedy_parity(prompt, c, 8)

    @feature("Sampling: temperature, top_p, top_k")
    def test_top_p(self, conformance: ConformanceHarness) -> None:
        with honoured_or_rejected("top_p"):
            self._check_first_token_distribution(conformance, top_p=0.6)

    @feature("Sampling: min_p")
    def test_min_p(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "min_p", {"max_generate_length": 2, "min_p": 0.2})
        self._check_first_token_distribution(conformance, min_p=0.2)

    @feature("Sampling: repetition_penalty")
    def test_repetition_penalty(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "repetition_penalty",
                          {"max_generate_length": 2, "repetition_penalty": 1.5})
        prompts = conformance.reference.prompts(4, seed=14, min_len=8, max_len=16)
        changed = [p for p in prompts if conformance.reference.greedy(p, 16, repetition_penalty=2.0).token_ids
                   != conformance.reference.greedy(p, 16).token_ids]
        assert changed, "suite self-check: repetition_penalty=2.0 changes no reference output for these prompts"
        out = conformance.greedy(prompts, 16, repetition_penalty=2.0)
        for prompt, c in zip(prompts, out, strict=True):
            conformance.assert_greedy_parity(prompt, c, 16, repetition_penalty=2.0)

    @feature("Sampling: seed")
    def test_seed_reproduces(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "seed", {"max_generate_length": 2, "seed": 1})
        prompts = conformance.reference.prompts(3, seed=15)
        params = {"max_generate_length": 12, "temperature": 1.0, "seed": 1234}
        first = conformance.generate(prompts, params).response_ids
        again = conformance.generate(prompts, params).response_ids
        assert first == again, "the same seed gave different samples"
        # A seeded sequence does not depend on what else is in the batch.
        alone = conformance.generate([prompts[1]], params).response_ids[0]
        assert alone == first[1], "a seeded sample changed with the rest of its batch"
        other = conformance.generate(prompts, {**params, "seed": 4321}).response_ids
        assert other != first, "different seeds gave identical samples for every prompt"

    @feature("Sampling: n > 1")
    def test_n_samples(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=16)
        out = conformance.generate(prompts, {"max_generate_length": 6, "n": 3, "temperature": 0.0})
        assert len(out) == 6
        for i, prompt in enumerate(prompts):
            for j in range(3):
                conformance.assert_greedy_parity(prompt, out[3 * i + j], 6)

    @feature("Sampling: n > 1")
    @requires(capabilities.SEEDED_SAMPLING)
    def test_n_samples_seeded(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=17)
        params = {"max_generate_length": 6, "temperature": 1.0, "seed": 50}
        out = conformance.generate(prompts, {**params, "n": 3})
        for j in range(3):
            single = conformance.generate(prompts, {**params, "seed": 50 + j})
            assert [out[3 * i + j].token_ids for i in range(2)] == single.response_ids, (
                f"sample {j} of n=3 with seed 50 must equal n=1 with seed {50 + j}")

    def test_logprobs_off_and_chosen_only(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=18)[0]
        none = conformance.greedy([prompt], 4)[0]
        assert none.logprobs is None and none.top_logprobs is None
        zero = conformance.greedy([prompt], 4, logprobs=0)[0]
        assert zero.logprobs is not None and len(zero.logprobs) == len(zero.token_ids)
        assert not zero.top_logprobs, "logprobs=0 asks for the chosen token only"

    @feature("Token ids only (detokenize=False)")
    def test_detokenize_off_returns_the_same_ids_without_text(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=19)
        with_text = conformance.greedy(prompts, 6, logprobs=0)
        ids_only = conformance.greedy(prompts, 6, logprobs=0, detokenize=False)
        assert [c.text for c in ids_only] == [None, None], "detokenize=False returns no text"
        assert all(isinstance(c.text, str) for c in with_text), "text is returned by default"
        assert ids_only.response_ids == with_text.response_ids
        assert [c.finish_reason for c in ids_only] == [c.finish_reason for c in with_text]
        assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in ids_only)

    def test_unknown_parameter_is_rejected(self, conformance: ConformanceHarness) -> None:
        with pytest.raises(SamplingParamsError, match="temprature"):
            conformance.generate([[1, 2]], {"temprature": 0.5})
