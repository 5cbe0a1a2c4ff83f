"""A stop token id or EOS that is also the last allowed token is a stop, whatever SGLang reports."""

from skyrl_backend_sglang.engine import stop_on_last_token
from skyrl_backends.sampling import SamplingParams

EOS = [2]


def test_eos_as_the_last_allowed_token_is_a_stop():
    assert stop_on_last_token("length", [5, 6, 2], None, SamplingParams(), EOS) == ("stop", 2)


def test_a_stop_token_id_as_the_last_allowed_token_is_a_stop_naming_it():
    params = SamplingParams(stop_token_ids=[6])
    assert stop_on_last_token("length", [5, 6], None, params, EOS) == ("stop", 6)


def test_ignored_eos_and_ordinary_tokens_stay_length():
    assert stop_on_last_token("length", [5, 2], None, SamplingParams(ignore_eos=True), EOS) == ("length", None)
    assert stop_on_last_token("length", [5, 7], None, SamplingParams(), EOS) == ("length", None)
    assert stop_on_last_token("length", [], None, SamplingParams(), EOS) == ("length", None)


def test_other_finish_reasons_are_kept():
    assert stop_on_last_token("stop", [5, 2], 2, SamplingParams(), EOS) == ("stop", 2)
    assert stop_on_last_token("abort", [5, 2], None, SamplingParams(), EOS) == ("abort", None)
