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


# -- one rule, derived from the field types, for every source ---------------------------------------
@pytest.mark.parametrize(("field", "value", "accepted"), [
    ("enable_prefix_caching", "false", "true or false"),   # a string is not a boolean
    ("enable_lora", 1, "true or false"),
    ("dtype", "float33", "auto / float32 / bfloat16 / float16"),
    ("device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("seed", "x", "an integer"),
    ("seed", True, "an integer"),
    ("http_endpoint_port", "abc", "an integer"),
    ("max_num_seqs", 2.5, "an integer"),
    ("gpu_memory_utilization", "0.5", "a number"),
    ("backend", "", "a backend name"),
    ("model", 3, "a string"),
])
def test_bad_values_name_the_key_the_value_and_what_is_accepted(field, value, accepted):
    for build in (lambda: GeneratorConfig.from_dict({field: value}),  # a dict or YAML document
                  lambda: GeneratorConfig(**{field: value}),          # Python
                  lambda: load_config(None, **{field: value})):       # keyword overrides
        with pytest.raises(ConfigError) as info:
            build()
        assert info.value.field == field
        assert repr(value) in str(info.value) and accepted in str(info.value)


def test_yaml_values_go_through_the_same_rule(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text("generator:\n  enable_prefix_caching: 'false'\n")
    with pytest.raises(ConfigError, match="enable_prefix_caching: got 'false'"):
        GeneratorConfig.from_yaml(path)
    path.write_text("generator:\n  enable_prefix_caching: false\n  device: cuda:1\n")
    config = GeneratorConfig.from_yaml(path)
    assert config.enable_prefix_caching is False and config.device == "cuda:1"


def test_dotted_command_line_overrides():
    from skyrl_backends.config import parse_overrides

    values = parse_overrides(["generator.backend=sglang", "generator.enable_prefix_caching=false",
                              "generator.engine_init_kwargs.max_logprobs=5", "sampling_params.temperature=0.5",
                              "max_model_len=null"])
    config = load_config(values)
    assert (config.backend, config.enable_prefix_caching, config.max_model_len) == ("sglang", False, None)
    assert config.engine_init_kwargs == {"max_logprobs": 5}
    assert config.sampling_params.temperature == 0.5
    with pytest.raises(ConfigError, match="Did you mean 'max_num_seqs'"):
        parse_overrides(["generator.max_num_seq=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["generator.backend"])
    with pytest.raises(ConfigError) as info:  # YAML reads "abc" as a string: the port rule rejects it
        load_config(parse_overrides(["generator.http_endpoint_port=abc"]))
    assert info.value.field == "http_endpoint_port"


def test_unknown_backend_is_a_config_error_naming_the_key(double_backend, tmp_path):
    import skyrl_backends as sb

    with pytest.raises(ConfigError) as info:
        sb.create_engine(config={"backend": "doubel", "model": str(tmp_path)})
    assert info.value.field == "backend"
    assert "Did you mean 'double'?" in str(info.value)
