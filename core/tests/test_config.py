import pytest

from skyrl_backends import ConfigError, GeneratorConfig, load_config


def test_design_generator_section_is_accepted(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text(
        "generator:\n"
        "  backend: sglang\n"
        "  num_inference_engines: 2\n"
        "  inference_engine_tensor_parallel_size: 4\n"
        "  gpu_memory_utilization: 0.8\n"
        "  max_num_batched_tokens: 8192\n"
        "  max_num_seqs: 1024\n"
        "  enable_prefix_caching: true\n"
        "  weight_sync_backend: nccl\n"
        "  enable_lora: true\n"
        "  engine_init_kwargs: {attention_backend: fa3}\n"
        "  sampling_params: {max_generate_length: 1024, temperature: 1.0, logprobs: 0, stop: ['</s>']}\n"
    )
    config = GeneratorConfig.from_yaml(path)
    assert config.backend == "sglang"
    assert config.inference_engine_tensor_parallel_size == 4
    assert config.engine_init_kwargs == {"attention_backend": "fa3"}
    assert config.sampling_params.stop == ("</s>",)
    assert config.sampling_params.logprobs == 0


def test_misspelled_key_is_named_with_suggestion():
    with pytest.raises(ConfigError) as info:
        GeneratorConfig.from_dict({"gpu_memory_utilisation": 0.5})
    assert info.value.field == "gpu_memory_utilisation"
    assert "Did you mean 'gpu_memory_utilization'?" in str(info.value)


def test_misspelled_sampling_key_inside_config_is_named():
    with pytest.raises(ConfigError, match="max_generate_lenght.*Did you mean 'max_generate_length'"):
        GeneratorConfig.from_dict({"sampling_params": {"max_generate_lenght": 3}})


@pytest.mark.parametrize(("field", "value"), [
    ("num_inference_engines", 0), ("inference_engine_tensor_parallel_size", -1), ("gpu_memory_utilization", 1.5),
    ("max_num_seqs", 0), ("weight_sync_backend", "carrier-pigeon"), ("engine_init_kwargs", [1]),
    ("http_endpoint_port", 70000), ("max_model_len", 0),
])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        GeneratorConfig.from_dict({field: value})
    assert info.value.field == field
    assert "accepted" in str(info.value)


def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        GeneratorConfig.from_yaml(path)


def test_load_config_applies_overrides_and_checks_them():
    config = load_config({"backend": "vllm"}, model="/m", max_num_seqs=3)
    assert (config.backend, config.model, config.max_num_seqs) == ("vllm", "/m", 3)
    with pytest.raises(ConfigError, match="Did you mean 'max_num_seqs'"):
        load_config({"backend": "vllm"}, max_num_seq=3)


def test_http_endpoint_binds_loopback_by_default():
    assert GeneratorConfig().http_endpoint_host == "127.0.0.1"
