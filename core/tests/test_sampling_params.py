import pytest

from skyrl_backends import SamplingParams, SamplingParamsError

INVALID = [
    ("max_generate_length", 0, "integer >= 1"),
    ("max_generate_length", 2.5, "integer >= 1"),
    ("temperature", -0.1, "0 (greedy) or a finite number >= 1e-05"),
    ("temperature", float("nan"), "0 (greedy) or a finite number >= 1e-05"),
    # Schema-valid values that used to crash sampling (logits / 1e-40 overflow to inf, then NaN).
    ("temperature", 1e-40, "0 (greedy) or a finite number >= 1e-05"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", 0, "-1 (disabled)"),
    ("top_k", -2, "-1 (disabled)"),
    ("min_p", 1.5, "[0, 1]"),
    ("repetition_penalty", 0.0, ">= 1e-05"),
    ("repetition_penalty", 1e-300, ">= 1e-05"),
    ("repetition_penalty", float("inf"), ">= 1e-05"),
    ("logprobs", -1, "None (off)"),
    ("logprobs", True, "None (off)"),
    ("stop", [""], "non-empty strings"),
    ("stop", [3], "non-empty strings"),
    ("stop_token_ids", [-1], "non-negative integer"),
    ("min_new_tokens", -1, "integer >= 0"),
    ("ignore_eos", "yes", "true or false"),
    ("detokenize", 0, "true (completions carry their text) or false (token ids only)"),
    ("seed", -5, "None or an integer in [0, 9223372036854775807]"),
    ("seed", 2**64, "None or an integer in [0, 9223372036854775807]"),  # overflowed torch's generator
    ("n", 0, "integer >= 1"),
    ("n", 10**9, "SKYRL_BACKENDS_MAX_N"),
    ("stop", 5, "a list of strings"),
    ("stop_token_ids", 7, "a list of token ids"),
]


@pytest.mark.parametrize(("field", "value", "accepted"), INVALID)
def test_every_invalid_value_names_field_value_and_what_is_accepted(field, value, accepted):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({field: value})
    message = str(info.value)
    assert info.value.field == field
    assert message.startswith(f"{field}:")
    assert repr(value) in message or str(value) in message
    assert accepted in message


def test_min_new_tokens_cannot_exceed_max_length():
    with pytest.raises(SamplingParamsError, match="min_new_tokens.*at most max_generate_length \\(4\\)"):
        SamplingParams(max_generate_length=4, min_new_tokens=5)


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"temprature": 0.5})
    assert info.value.field == "temprature"
    assert "Did you mean 'temperature'?" in str(info.value)


def test_design_aliases_are_translated():
    params = SamplingParams.from_dict({"max_tokens": 7, "min_tokens": 2})
    assert (params.max_generate_length, params.min_new_tokens) == (7, 2)
    params = SamplingParams.from_dict({"max_new_tokens": 9})
    assert params.max_generate_length == 9


def test_alias_and_canonical_name_together_is_an_error():
    with pytest.raises(SamplingParamsError, match="given twice"):
        SamplingParams.from_dict({"max_tokens": 7, "max_generate_length": 8})


def test_lists_are_frozen_and_round_trip():
    params = SamplingParams.from_dict({"stop": ["a", "bc"], "stop_token_ids": [3, 4], "logprobs": 2})
    assert params.stop == ("a", "bc") and params.stop_token_ids == (3, 4)
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert hash(params) == hash(SamplingParams.from_dict(params.to_dict()))


def test_single_stop_string_is_accepted():
    assert SamplingParams(stop="x").stop == ("x",)


def test_uses_lists_non_default_fields():
    assert SamplingParams(temperature=0, seed=3).uses() == {"temperature", "seed"}


def test_replace_validates_and_rejects_unknown():
    params = SamplingParams()
    assert params.replace(top_k=5).top_k == 5
    with pytest.raises(SamplingParamsError):
        params.replace(top_k=0)
    with pytest.raises(SamplingParamsError, match="Did you mean 'top_k'"):
        params.replace(topk=5)


def test_seed_plus_samples_must_fit_64_bits():
    SamplingParams(seed=2**63 - 1)
    with pytest.raises(SamplingParamsError, match="seed.*9223372036854775804"):
        SamplingParams(seed=2**63 - 1, n=4)


def test_n_limit_is_raised_with_its_environment_variable(monkeypatch):
    from skyrl_backends import limits

    with pytest.raises(SamplingParamsError, match="at most 4096"):
        SamplingParams(n=limits.MAX_N + 1)
    monkeypatch.setenv(limits.MAX_N_ENV, str(limits.MAX_N + 1))
    assert SamplingParams(n=limits.MAX_N + 1).n == limits.MAX_N + 1


@pytest.mark.parametrize("values", [[("temperature", 0.5)], ["temperature"], "temperature=1", 3])
def test_sampling_params_that_are_not_a_mapping_name_the_field(values):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict(values)
    assert info.value.field == "sampling_params"
