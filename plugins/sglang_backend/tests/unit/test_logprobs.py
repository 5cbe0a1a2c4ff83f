"""Log-probability extraction from SGLang's meta_info (pure)."""

import pytest

from skyrl_backend_sglang import logprobs as lp


def test_tuples_and_bare_floats():
    assert lp.token_logprobs([(-0.5, 3, None), (-1.5, 4, None)], [3, 4]) == [-0.5, -1.5]
    assert lp.token_logprobs([-0.5, -1.5], [3, 4]) == [-0.5, -1.5]


def test_misaligned_entries_are_refused():
    with pytest.raises(ValueError, match="token 4"):
        lp.token_logprobs([(-0.5, 3, None), (-1.5, 5, None)], [3, 4])
    with pytest.raises(ValueError, match="1 log-probabilities for 2"):
        lp.token_logprobs([(-0.5, 3, None)], [3, 4])
    with pytest.raises(ValueError, match="no log-probability"):
        lp.token_logprobs([(None, 3, None)], [3])


def test_extra_entries_after_a_trim_are_ignored():
    # A stop-string response is trimmed; the engine reported log-probabilities for more tokens.
    meta = {"output_token_logprobs": [(-1.0, 1, None), (-2.0, 2, None), (-3.0, 9, None)],
            "output_top_logprobs": [[(-1.0, 1, None), (-1.1, 7, None)], [(-2.0, 2, None), (-2.2, 8, None)], None]}
    chosen, top = lp.from_output(meta, [1, 2], 2)
    assert chosen == [-1.0, -2.0]
    assert top == [{1: -1.0, 7: -1.1}, {2: -2.0, 8: -2.2}]
    assert lp.from_output(meta, [1, 2], 0)[1] is None


def test_top_is_cut_to_n():
    assert lp.top_logprobs([[(-1.0, 1, None), (-2.0, 2, None), (-3.0, 3, None)]], 1, 2) == [{1: -1.0, 2: -2.0}]


def test_prefill_takes_the_last_entries():
    meta = {"input_token_logprobs": [(None, 5, None), (-1.0, 1, None), (-2.0, 2, None)],
            "input_top_logprobs": [None, [(-1.0, 1, None)], [(-0.5, 6, None)]]}
    chosen, top = lp.from_prefill(meta, [1, 2], 1)
    assert chosen == [-1.0, -2.0] and top == [{1: -1.0}, {6: -0.5}]
    with pytest.raises(ValueError, match="3 prompt log-probabilities for 4"):
        lp.from_prefill(meta, [5, 1, 2, 3], 0)
