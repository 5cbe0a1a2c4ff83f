"""The per-batch consistency helper against values worked out by hand.

The batch below uses log-probabilities that are exact in binary, so every delta is exact and the
threshold comparisons cannot flip on rounding:

    sequence 0: engine [-1.0, -2.0],         trainer [-1.25, -1.5]          log ratios p - e: [-0.25, 0.5]
    sequence 1: engine [-0.5],               trainer [-0.5]                 [0.0]
    sequence 2: engine [-3.0, -0.125, -1.0], trainer [-3.0625, -0.125, -1.0] [-0.0625, 0.0, 0.0]
"""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyrl_backends.consistency import measure_batch, mismatch_metrics, truncated_importance_weights
from skyrl_backends.consistency.metrics import quantile
from skyrl_backends.errors import ConfigError

ENGINE = [[-1.0, -2.0], [-0.5], [-3.0, -0.125, -1.0]]
TRAINER = [[-1.25, -1.5], [-0.5], [-3.0625, -0.125, -1.0]]
approx = pytest.approx


def test_token_statistics() -> None:
    m = mismatch_metrics(ENGINE, TRAINER)
    assert (m.sequences, m.tokens) == (3, 6)
    # |e - p| = 0.25, 0.5, 0, 0.0625, 0, 0
    assert m.mean_abs_delta == approx(0.8125 / 6)
    assert m.max_abs_delta == 0.5
    assert m.mean_delta == approx((0.25 - 0.5 + 0.0625) / 6)  # e - p, signed
    assert m.frac_over_threshold == approx(2 / 6)  # 0.25 and 0.5 exceed 0.1; 0.0625 does not
    # k3 = exp(x) - 1 - x for x = p - e: (0.7788007830714049 - 0.75) + (1.6487212707001282 - 1.5)
    # + (0.9394130628134758 - 0.9375), the zeros add nothing
    assert m.k3_kl == approx((0.0288007830714049 + 0.1487212707001282 + 0.0019130628134758) / 6)


def test_sequence_ratio_quantiles_interpolate_in_log_space() -> None:
    ratio = mismatch_metrics(ENGINE, TRAINER).sequence_ratio
    # sequence log ratios, sorted: -0.0625, 0.0, 0.25
    assert ratio == {
        "min": approx(0.9394130628134758),   # exp(-0.0625)
        "p05": approx(0.9453027806520595),   # position 0.1:  exp(-0.0625 + 0.1 * 0.0625)
        "p25": approx(0.9692332344763441),   # position 0.5:  exp(-0.03125)
        "p50": approx(1.0),                  # exp(0)
        "p75": approx(1.1331484530668263),   # position 1.5:  exp(0.125)
        "p95": approx(math.exp(0.225)),      # position 1.9:  exp(0.9 * 0.25)
        "max": approx(1.2840254166877414),   # exp(0.25)
    }


def test_truncated_weights_token_and_sequence() -> None:
    w = truncated_importance_weights(ENGINE, TRAINER, cap=1.2)
    assert w.cap == 1.2
    assert w.token == [[approx(0.7788007830714049), 1.2], [1.0], [approx(0.9394130628134758), 1.0, 1.0]]
    # sequence ratios exp(0.25) = 1.284 (capped), exp(0) = 1, exp(-0.0625)
    assert w.sequence == [1.2, 1.0, approx(0.9394130628134758)]
    assert w.token_clip_fraction == approx(1 / 6)
    assert w.sequence_clip_fraction == approx(1 / 3)


def test_masked_tokens_count_in_nothing_and_weigh_zero() -> None:
    masks = [[1, 0], [0], [True, True, False]]
    batch = measure_batch(ENGINE, TRAINER, masks=masks, cap=2.0)
    m = batch.metrics
    # counted log ratios: [-0.25], [], [-0.0625, 0.0]; sequence 1 has no counted token
    assert (m.sequences, m.tokens) == (2, 3)
    assert m.mean_abs_delta == approx(0.3125 / 3)
    assert m.max_abs_delta == 0.25
    assert m.frac_over_threshold == approx(1 / 3)
    assert m.sequence_ratio["min"] == approx(math.exp(-0.25))
    assert m.sequence_ratio["max"] == approx(math.exp(-0.0625))
    assert batch.weights.token == [[approx(math.exp(-0.25)), 0.0], [0.0], [approx(math.exp(-0.0625)), 1.0, 0.0]]
    assert batch.weights.sequence == [approx(math.exp(-0.25)), 0.0, approx(math.exp(-0.0625))]
    assert batch.weights.sequence_clip_fraction == 0.0


def test_nothing_counted_gives_none_not_zero() -> None:
    batch = measure_batch([[-1.0], []], [[-2.0], []], masks=[[0], []])
    m = batch.metrics
    assert (m.sequences, m.tokens) == (0, 0)
    assert m.mean_abs_delta is None and m.k3_kl is None and m.sequence_ratio is None
    assert batch.weights.token == [[0.0], []]
    assert batch.weights.sequence == [0.0, 0.0]
    assert batch.weights.token_clip_fraction is None


def test_metrics_per_weight_version() -> None:
    versions = [3, [3], [3, 4, 4]]
    batch = measure_batch(ENGINE, TRAINER, versions=versions)
    assert sorted(batch.by_version) == [3, 4]
    v3, v4 = batch.by_version[3], batch.by_version[4]
    assert (v3.sequences, v3.tokens) == (3, 4)
    assert v3.mean_abs_delta == approx(0.8125 / 4)
    assert (v4.sequences, v4.tokens) == (1, 2)
    assert v4.mean_abs_delta == 0.0 and v4.k3_kl == 0.0 and v4.sequence_ratio["p50"] == 1.0
    # the whole batch is unchanged by the breakdown
    assert batch.metrics == mismatch_metrics(ENGINE, TRAINER)
    assert batch.to_dict()["by_version"][4]["tokens"] == 2


def test_versions_skip_masked_tokens() -> None:
    batch = measure_batch(ENGINE, TRAINER, masks=[[1, 1], [1], [1, 0, 0]], versions=[3, 3, [3, 4, 4]])
    assert list(batch.by_version) == [3]


def test_k3_keeps_its_digits_near_zero() -> None:
    x = 1e-9
    m = mismatch_metrics([[0.0]], [[x]])
    assert m.k3_kl == approx(x * x / 2, rel=1e-5)  # exp(x) - 1 - x computed naively would give 0 or less


def test_huge_ratios_saturate_instead_of_overflowing() -> None:
    engine = [[-800.0, -1.0]]
    trainer = [[-0.5, -1.0]]
    batch = measure_batch(engine, trainer, cap=5.0)
    assert batch.metrics.sequence_ratio["max"] == math.inf
    assert batch.metrics.k3_kl == math.inf
    assert batch.weights.token == [[5.0, 1.0]]
    assert batch.weights.sequence == [5.0]


def test_reads_tuples_and_other_number_types() -> None:
    m = mismatch_metrics(((-1.0, -2.0),), [iter([-1.25, -1.5])])
    assert m.tokens == 2 and m.max_abs_delta == 0.5


def test_quantile_is_numpys_linear_rule() -> None:
    values = [1.0, 2.0, 4.0, 8.0]
    assert quantile(values, 0.0) == 1.0
    assert quantile(values, 1.0) == 8.0
    assert quantile(values, 0.5) == 3.0          # between 2 and 4
    assert quantile(values, 0.9) == approx(6.8)  # position 2.7: 4 + 0.7 * 4
    assert quantile([7.0], 0.3) == 7.0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0], [-2.0]]}, "trainer_logprobs"),
    ({"engine_logprobs": [[-1.0, -2.0]], "trainer_logprobs": [[-1.0]]}, "trainer_logprobs[0]"),
    ({"engine_logprobs": [[-1.0, math.nan]], "trainer_logprobs": [[-1.0, -2.0]]}, "engine_logprobs[0][1]"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-math.inf]]}, "trainer_logprobs[0][0]"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [["x"]]}, "trainer_logprobs[0][0]"),
    ({"engine_logprobs": [-1.0], "trainer_logprobs": [-1.0]}, "engine_logprobs[0]"),
    ({"engine_logprobs": "abc", "trainer_logprobs": [[-1.0]]}, "engine_logprobs"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "masks": [[1], [1]]}, "masks"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "masks": [[1, 1]]}, "masks[0]"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "versions": [1, 2]}, "versions"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "versions": [[1, 2]]}, "versions[0]"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "versions": [1.5]}, "versions[0]"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "cap": 0.0}, "cap"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "cap": math.inf}, "cap"),
    ({"engine_logprobs": [[-1.0]], "trainer_logprobs": [[-1.0]], "threshold": -0.1}, "threshold"),
])
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        measure_batch(**kwargs)
    assert caught.value.field == field


def test_needs_neither_torch_nor_numpy() -> None:
    import subprocess

    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "from skyrl_backends.consistency import measure_batch\n"
            "print(measure_batch([[-1.0]], [[-1.5]]).metrics.max_abs_delta)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.5"


logprob = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)


@given(st.lists(st.lists(st.tuples(logprob, logprob), max_size=8), min_size=1, max_size=6),
       st.floats(min_value=1.0, max_value=10.0))
def test_invariants(pairs: list[list[tuple[float, float]]], cap: float) -> None:
    engine = [[e for e, _ in row] for row in pairs]
    trainer = [[p for _, p in row] for row in pairs]
    batch = measure_batch(engine, trainer, cap=cap)
    m = batch.metrics
    assert all(0.0 <= w <= cap for row in batch.weights.token for w in row)
    assert all(0.0 <= w <= cap for w in batch.weights.sequence)
    if m.tokens:
        assert m.k3_kl >= 0.0
        assert m.mean_abs_delta <= m.max_abs_delta + 1e-12
        assert abs(m.mean_delta) <= m.mean_abs_delta + 1e-12
        values = list(m.sequence_ratio.values())
        assert values == sorted(values)
    # swapping engine and trainer mirrors the signed delta
    swapped = mismatch_metrics(trainer, engine)
    if m.tokens:
        assert swapped.mean_delta == approx(-m.mean_delta, abs=1e-12)
