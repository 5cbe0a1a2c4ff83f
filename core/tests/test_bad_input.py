"""Bad input through the Python API: every value a user can pass gets an error naming the field,
never a raw exception from deep inside, and nothing allocates without bound."""

import pytest
from skyrl_backends import SamplingParams
from skyrl_backends.errors import ConfigError, SamplingParamsError
from skyrl_backends.types import GenerateRequest


def test_an_empty_batch_is_an_error_naming_the_field():
    with pytest.raises(ConfigError) as info:
        GenerateRequest(prompt_token_ids=[])
    assert info.value.field == "prompt_token_ids" and "at least one prompt" in str(info.value)


@pytest.mark.parametrize("params", [[{"temperature": 0.5}], ["temperature", 0.5], ("max_tokens", 4), 7])
def test_sampling_params_of_the_wrong_type_name_the_field(params):
    with pytest.raises(SamplingParamsError) as info:
        GenerateRequest(prompt_token_ids=[[1, 2]], sampling_params=params)
    assert info.value.field == "sampling_params"


def test_a_single_prompt_instead_of_a_batch_says_how_to_wrap_it():
    with pytest.raises(ConfigError, match=r"prompt_token_ids\[0\].*wrapped in a list"):
        GenerateRequest(prompt_token_ids=[5, 6, 7])


def test_prompts_per_request_are_capped_and_the_error_says_how_to_raise_the_cap(monkeypatch):
    from skyrl_backends import limits

    monkeypatch.setenv(limits.MAX_PROMPTS_ENV, "3")
    GenerateRequest(prompt_token_ids=[[1]] * 3)
    with pytest.raises(ConfigError, match=f"4 prompts.*limit of 3.*{limits.MAX_PROMPTS_ENV}"):
        GenerateRequest(prompt_token_ids=[[1]] * 4)


def test_a_mapping_and_none_still_work():
    assert GenerateRequest([[1]], sampling_params={"max_tokens": 3}).sampling_params.max_generate_length == 3
    assert GenerateRequest([[1]], sampling_params=None).sampling_params == SamplingParams()
    assert GenerateRequest(((1, 2), iter([3]))).prompt_token_ids == [[1, 2], [3]]
