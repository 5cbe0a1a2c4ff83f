"""The sampling checks' widened truncation boundaries: an engine's rounding may move a token just
across a boundary, never a token well past it."""

from __future__ import annotations

import math

import torch

from skyrl_backends.conformance.suite.sampling import reference_distribution, tolerated_support


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def test_zero_tolerance_is_the_reference_support() -> None:
    logits = _logits([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    for params in ({"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.3}, {"top_k": 4, "top_p": 0.5}):
        exact = reference_distribution(logits, **params) > 0
        assert torch.equal(tolerated_support(logits, 0.0, **params), exact), params


def test_top_p_boundary_widens_by_the_tolerance() -> None:
    # Mass before each token: 0, 0.4, 0.65, 0.8, 0.9, 0.96. top_p=0.64 keeps two tokens exactly;
    # the third starts at 0.65, within 2% of the boundary, the fourth at 0.8, far past it.
    logits = _logits([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    assert tolerated_support(logits, 0.0, top_p=0.64).tolist() == [True, True, False, False, False, False]
    assert tolerated_support(logits, 0.05, top_p=0.64).tolist() == [True, True, True, False, False, False]


def test_top_k_and_min_p_boundaries_widen_in_log_space() -> None:
    logits = _logits([0.4, 0.25, 0.24, 0.06, 0.05])
    # The third token is within 0.05 nats of the second (the k-th for top_k=2); the fourth is not.
    assert tolerated_support(logits, 0.05, top_k=2).tolist() == [True, True, True, False, False]
    # min_p=0.6 puts the threshold at 0.24: the third token is exactly on it, kept in both cases.
    assert tolerated_support(logits, 0.0, min_p=0.6).tolist() == [True, True, True, False, False]


def test_temperature_applies_before_the_boundaries() -> None:
    logits = _logits([0.5, 0.3, 0.2])
    hot = tolerated_support(logits, 0.0, temperature=100.0, top_p=0.5)
    cold = tolerated_support(logits, 0.0, temperature=0.1, top_p=0.5)
    assert hot.tolist() == [True, True, False] and cold.tolist() == [True, False, False]
