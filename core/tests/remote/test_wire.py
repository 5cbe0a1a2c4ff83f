"""The engine protocol's wire format: every value survives the round trip through JSON exactly, a
malformed field is an error naming it, and every error the library raises comes back as its own
class with its message and attributes."""

from __future__ import annotations

import math

import pytest
from skyrl_backends import errors
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.errors import ConfigError, RemoteEngineError, SamplingParamsError, WeightUpdateError
from skyrl_backends.remote import wire
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import (
    Completion,
    GenerateOutput,
    GenerateRequest,
    StreamChunk,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)
from skyrl_backends.weight_sync.manifest import request_from_json, request_to_json


def through_json(value):
    return wire.loads(wire.dumps(value))


def test_a_generate_request_round_trips_with_its_ids_and_parameters():
    request = GenerateRequest([[1, 2, 3], [4]], SamplingParams(max_generate_length=7, temperature=0.0, stop=("x",),
                                                                 logprobs=2, seed=5, n=2),
                              request_ids=["a", "b"], session_ids=["s", None], lora_name="adapter")
    back = wire.generate_request_from_json(through_json(wire.generate_request_to_json(request)))
    assert back == request


def test_only_non_default_sampling_parameters_travel():
    assert wire.sampling_to_json(SamplingParams(temperature=0.5)) == {"temperature": 0.5}


@pytest.mark.parametrize("body, field", [
    ({"prompt_token_ids": "12"}, "request.prompt_token_ids"),
    ({}, "request.prompt_token_ids"),
    ({"prompt_token_ids": [[1]], "bogus": 1}, "request.bogus"),
    ({"prompt_token_ids": [[1]], "request_ids": [3]}, "request.request_ids"),
    ({"prompt_token_ids": [[1]], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"prompt_token_ids": [[1]], "sampling_params": {"tempreature": 1}}, "tempreature"),
    ({"prompt_token_ids": [[-1]]}, "prompt_token_ids[0]"),
    ({"prompt_token_ids": [[1]], "lora_name": 5}, "request.lora_name"),
])
def test_a_malformed_request_is_an_error_naming_the_field(body, field):
    with pytest.raises(ConfigError) as info:
        wire.generate_request_from_json(body)
    assert info.value.field == field


def test_completions_round_trip_exactly_with_integer_token_ids_in_top_logprobs():
    completion = Completion(token_ids=[5, 6], finish_reason="stop", logprobs=[-0.1234567890123, -math.inf],
                            top_logprobs=[{5: -0.1, 9: -2.5}, {6: -math.inf}], text="hi", stop_reason=6,
                            request_id="r", token_versions=TokenVersions(((0, 3), (1, 4)), 2), lora_version=2)
    back = wire.output_from_json(through_json(wire.output_to_json(GenerateOutput([completion]))))
    assert back.completions == [completion]
    assert all(isinstance(t, int) for step in back[0].top_logprobs for t in step)
    assert back[0].token_versions.per_token() == [3, 4] and back[0].weight_version == 4


@pytest.mark.parametrize("versions", [None, TokenVersions((), 0), TokenVersions.uniform(0, 5)],
                         ids=["none", "no-runs", "empty-with-its-version"])
def test_the_versions_of_a_completion_without_tokens_round_trip(versions):
    completion = Completion(token_ids=[], finish_reason="abort", token_versions=versions)
    assert wire.completion_from_json(through_json(wire.completion_to_json(completion))) == completion


def test_stream_chunks_round_trip_with_their_token_versions():
    final = Completion(token_ids=[1, 2, 3], finish_reason="length", logprobs=[-1.0, -2.0, -3.0],
                       token_versions=TokenVersions(((0, 1), (2, 2)), 3), lora_version=7)
    chunks = (StreamChunk(0, [1], [-1.0]), StreamChunk(0, [1], [-1.0], token_versions=TokenVersions.uniform(1, 1)),
              StreamChunk(0, [], token_versions=TokenVersions((), 0)), StreamChunk.final(3, final, start=1))
    for chunk in chunks:
        assert wire.chunk_from_json(through_json(wire.chunk_to_json(chunk))) == chunk
    assert chunks[-1].token_versions.runs == ((0, 1), (1, 2))  # the versions of the chunk's own tokens


@pytest.mark.parametrize("versions, field", [
    ("[[0, 1]]", "completion.token_versions"),
    ([[0, "1"]], "completion.token_versions"),
    ([[1, 1]], "completion.token_versions"),           # the first run starts at token 0
    ([[0, 1], [2, 2]], "completion.token_versions"),   # a run starts beyond the 2 tokens
])
def test_malformed_token_versions_are_an_error_naming_the_field(versions, field):
    with pytest.raises(ConfigError) as info:
        wire.completion_from_json({"token_ids": [1, 2], "finish_reason": "stop", "token_versions": versions})
    assert info.value.field == field


def test_versions_that_do_not_cover_the_tokens_are_not_sent():
    completion = Completion(token_ids=[1, 2], finish_reason="stop", token_versions=TokenVersions.uniform(3, 1))
    with pytest.raises(ValueError, match="cover 3 token"):
        wire.completion_to_json(completion)


def test_check_finite_survives_a_weight_update_manifest():
    request = WeightUpdateRequest(["w"], ["float32"], [(2,)], "shared_memory", {"buckets": []}, check_finite=True)
    assert request_from_json(through_json(request_to_json(request))).check_finite is True


def test_the_servers_config_travels_without_its_keys():
    from skyrl_backends.config import GeneratorConfig

    config = GeneratorConfig(model="/m", max_lora_rank=8, enable_lora=True, http_endpoint_api_key="secret",
                             remote_inference_engine_api_key="secret2", engine_init_kwargs={"token": "secret3"})
    sent = through_json(wire.config_to_json(config))
    assert not {"http_endpoint_api_key", "remote_inference_engine_api_key", "engine_init_kwargs"} & set(sent)
    assert "secret" not in wire.dumps(sent).decode()
    back = wire.config_from_json({**sent, "a_field_of_a_newer_server": 1})
    assert (back.model, back.max_lora_rank, back.enable_lora) == ("/m", 8, True)
    assert back.http_endpoint_api_key is None and back.engine_init_kwargs == {}
    assert wire.config_from_json(None) is None and wire.config_from_json({"max_lora_rank": -1}) is None


def test_capabilities_specs_and_init_info_round_trip():
    caps = Capabilities(sleep_levels=(1, 2), discards_weights_at_level=2, lora=True, max_top_logprobs=20,
                        weight_sync_strategies=("tensors", "broadcast"))
    assert wire.capabilities_from_json(through_json(wire.capabilities_to_json(caps))) == caps
    specs = {"w": TensorSpec("w", (2, 3), "bfloat16"), "head": TensorSpec("head", (4, 3), "bfloat16", tied_to="embed")}
    assert wire.specs_from_json(through_json(wire.specs_to_json(specs))) == specs
    info = WeightSyncInitInfo("10.0.0.1", 29500, 1, 3, backend="nccl", extra={"timeout_s": 30})
    assert wire.init_info_from_json(through_json(wire.init_info_to_json(info))) == info


@pytest.mark.parametrize("value, field", [
    ({"master_addr": "h", "master_port": "29500", "rank_offset": 1, "world_size": 2}, "init_info.master_port"),
    ({"master_addr": "h", "master_port": 1, "rank_offset": 1, "world_size": 2, "rank": 1}, "init_info.rank"),
    ({"master_addr": "h"}, "init_info"),
])
def test_a_malformed_init_info_names_the_field(value, field):
    with pytest.raises(ConfigError) as info:
        wire.init_info_from_json(value)
    assert info.value.field == field


LIBRARY_ERRORS = [
    ConfigError("model", "no model given"),
    SamplingParamsError.out_of_range("temperature", -1, "a number >= 0"),
    errors.UnsupportedCapabilityError("transformers", "sleep level 3", "Declared levels: [1, 2]."),
    errors.EngineAsleepError(["weights", "kv_cache"]),
    errors.WeightsNotLoadedError("discarded at level 2"),
    errors.EngineClosedError(),
    errors.EngineStateError("2 request(s) still running"),
    WeightUpdateError({"a.weight": "shape (3,) does not match the engine's (4,)", "b": "no such parameter"}),
    errors.LoraAdapterError("No LoRA adapter named 'x' is loaded."),
    errors.EngineDeadError("engine 1 failed"),
    errors.BackendNotFoundError("sglng", ["sglang", "vllm"]),
    errors.BackendLoadError("vllm", "skyrl-backend-vllm", ValueError("boom")),
]


@pytest.mark.parametrize("error", LIBRARY_ERRORS, ids=lambda e: type(e).__name__)
def test_library_errors_come_back_as_the_same_class_with_message_and_attributes(error):
    status = wire.status_of(error)
    back = wire.error_from_json(through_json(wire.error_to_json(error)), status)
    assert type(back) is type(error)
    assert str(back) == str(error)
    for name, value in vars(error).items():
        expected = value if not isinstance(value, BaseException) else str(value)
        assert getattr(back, name) == expected, name


def test_status_codes_follow_what_went_wrong():
    assert wire.status_of(ConfigError("x", "y")) == 400
    assert wire.status_of(WeightUpdateError({"a": "b"})) == 400
    assert wire.status_of(errors.EngineAsleepError(["weights"])) == 409
    assert wire.status_of(errors.EngineClosedError()) == 503
    assert wire.status_of(TimeoutError("late")) == 504
    assert wire.status_of(ZeroDivisionError()) == 500


def test_builtin_and_unknown_errors():
    back = wire.error_from_json(wire.error_to_json(ValueError("bad value")), 500)
    assert type(back) is ValueError and str(back) == "bad value"
    unknown = wire.error_from_json(wire.error_to_json(ZeroDivisionError("x")), 500)
    assert isinstance(unknown, RemoteEngineError) and unknown.remote_type == "ZeroDivisionError"
    assert unknown.status == 500 and "x" in str(unknown)


def test_answers_that_are_not_the_wire_format():
    openai_style = {"error": {"message": "Missing or incorrect API key", "type": "authentication_error"}}
    refused = wire.error_from_json(openai_style, 401)
    assert isinstance(refused, ConfigError) and refused.field == "remote_inference_engine_api_key"
    too_big = wire.error_from_json({"error": {"message": "Request body is larger", "type": "invalid_request_error"}},
                                   413)
    assert isinstance(too_big, RemoteEngineError) and too_big.status == 413
    proxy_page = wire.error_from_json("<html>502 Bad Gateway</html>", 502)
    assert isinstance(proxy_page, RemoteEngineError) and "502" in str(proxy_page)


def test_fields_cannot_set_private_or_dunder_attributes():
    body = wire.error_to_json(errors.LoraAdapterError("x"))
    body["error"]["fields"] = {"__class__": "str", "_hidden": 1, "problems": {"a": "b"}}
    back = wire.error_from_json(body, 400)
    assert type(back) is errors.LoraAdapterError and not hasattr(back, "_hidden")


def test_non_finite_floats_survive():
    assert wire.loads(wire.dumps({"x": -math.inf}))["x"] == -math.inf
