"""Sampling and config translation (pure: runs without SGLang)."""

import pytest

from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError, SamplingParamsError
from skyrl_backends.sampling import SamplingParams
from skyrl_backend_sglang.translation import (
    MAX_TOP_LOGPROBS,
    check_server_arg_names,
    engine_kwargs,
    translate_sampling,
)


def test_design_table_names():
    plan = translate_sampling(SamplingParams(max_generate_length=33, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1,
                                             repetition_penalty=1.0, stop_token_ids=(9, 4, 9)))
    sp = plan.sampling_params
    assert sp["max_new_tokens"] == 33
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["min_p"]) == (0.7, 0.9, 5, 0.1)
    assert sp["stop_token_ids"] == [4, 9]
    assert sp["ignore_eos"] is False and sp["no_stop_trim"] is True
    assert translate_sampling(SamplingParams(ignore_eos=True)).sampling_params["ignore_eos"] is True
    assert "min_new_tokens" not in sp and "stop" not in sp and "sampling_seed" not in sp
    assert not plan.return_logprob and plan.top_logprobs_num == 0 and not plan.needs_processor


def test_logprobs_zero_and_n():
    zero = translate_sampling(SamplingParams(logprobs=0))
    assert zero.return_logprob and zero.top_logprobs_num == 0
    five = translate_sampling(SamplingParams(logprobs=5))
    assert five.return_logprob and five.top_logprobs_num == 5
    with pytest.raises(SamplingParamsError, match="logprobs"):
        translate_sampling(SamplingParams(logprobs=MAX_TOP_LOGPROBS + 1))


def test_stop_strings_stay_with_the_plugin():
    plan = translate_sampling(SamplingParams(stop=("\n\n", "</s>")))
    assert plan.stop_strings == ("\n\n", "</s>")
    assert "stop" not in plan.sampling_params and "stop_token_ids" not in plan.sampling_params


def test_min_new_tokens_goes_to_the_processor():
    plan = translate_sampling(SamplingParams(min_new_tokens=4, stop_token_ids=(7,), logprobs=0))
    assert plan.processor_params == {"min_new_tokens": 4, "stop_token_ids": [7], "ignore_eos": False}
    assert "self_sample" not in plan.processor_params
    assert "min_new_tokens" not in plan.sampling_params
    assert plan.rescore_logprobs  # the mask changes the distribution SGLang reports


def test_seed_samples_in_the_processor_and_untruncates_sglang():
    plan = translate_sampling(SamplingParams(seed=11, temperature=0.8, top_p=0.5, top_k=3, min_p=0.2))
    assert plan.seed == 11
    assert plan.processor_params == {"self_sample": True, "seed": 11, "temperature": 0.8, "top_p": 0.5, "top_k": 3,
                                     "min_p": 0.2, "repetition_penalty": 1.0}
    sp = plan.sampling_params
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["min_p"], sp["repetition_penalty"]) == (1.0, 1.0, -1, 0.0, 1.0)
    assert not plan.rescore_logprobs  # no log-probabilities asked for


def test_repetition_penalty_is_sampled_by_the_processor():
    # SGLang's penalizer sees only the response; the canonical penalty covers the prompt too.
    plan = translate_sampling(SamplingParams(repetition_penalty=1.3, temperature=0))
    assert plan.processor_params["self_sample"] and plan.processor_params["repetition_penalty"] == 1.3
    assert plan.processor_params["seed"] is None and plan.processor_params["temperature"] == 0.0
    assert plan.sampling_params["repetition_penalty"] == 1.0


def test_greedy_seed_needs_nothing():
    plan = translate_sampling(SamplingParams(seed=3, temperature=0))
    assert plan.seed is None and not plan.needs_processor and plan.sampling_params["temperature"] == 0.0


@pytest.mark.parametrize("params, rescore", [
    (SamplingParams(logprobs=0), False),
    (SamplingParams(logprobs=0, repetition_penalty=1.2), True),
    (SamplingParams(logprobs=2, seed=1), True),
    (SamplingParams(repetition_penalty=1.2), False),
])
def test_rescore_only_when_the_reported_distribution_is_altered(params, rescore):
    assert translate_sampling(params).rescore_logprobs is rescore


def test_engine_kwargs_mapping():
    cfg = GeneratorConfig(model="/m", inference_engine_tensor_parallel_size=2, inference_engine_pipeline_parallel_size=3,
                          inference_engine_data_parallel_size=4, inference_engine_expert_parallel_size=5,
                          gpu_memory_utilization=0.7, max_num_batched_tokens=4096, max_num_seqs=256, max_model_len=2048,
                          enable_prefix_caching=False, seed=9, dtype="bfloat16")
    kw = engine_kwargs(cfg)
    assert (kw["tp_size"], kw["pp_size"], kw["dp_size"], kw["ep_size"]) == (2, 3, 4, 5)
    assert kw["mem_fraction_static"] == 0.7
    assert kw["max_prefill_tokens"] == 4096 and kw["max_running_requests"] == 256
    assert kw["context_length"] == 2048 and kw["disable_radix_cache"] is True
    assert kw["skip_tokenizer_init"] is True and kw["enable_custom_logit_processor"] is True
    assert kw["model_path"] == "/m" and kw["random_seed"] == 9 and kw["dtype"] == "bfloat16"
    assert kw["enable_memory_saver"] is True and "device" not in kw and "enable_lora" not in kw


def test_cpu_has_no_memory_saver_and_lora_maps():
    kw = engine_kwargs(GeneratorConfig(model="/m", device="cpu", enable_lora=True, max_lora_rank=16, max_loras=2))
    assert kw["device"] == "cpu" and "enable_memory_saver" not in kw
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_loras_per_batch"]) == (True, 16, 2)
    assert kw["lora_target_modules"] == ["all"]


def test_engine_init_kwargs_pass_through_and_override():
    kw = engine_kwargs(GeneratorConfig(model="/m", engine_init_kwargs={"attention_backend": "triton",
                                                                       "mem_fraction_static": 0.3}))
    assert kw["attention_backend"] == "triton" and kw["mem_fraction_static"] == 0.3


def test_token_in_mode_cannot_be_turned_off():
    with pytest.raises(ConfigError, match="skip_tokenizer_init"):
        engine_kwargs(GeneratorConfig(model="/m", engine_init_kwargs={"skip_tokenizer_init": False}))


def test_unknown_server_arg_names_the_closest():
    with pytest.raises(ConfigError, match="attention_backend"):
        check_server_arg_names({"attention_backnd"}, {"attention_backend", "tp_size"})
    check_server_arg_names({"tp_size"}, {"attention_backend", "tp_size"})


def test_stop_ids_with_ignore_eos_are_watched_by_the_plugin():
    # SGLang's ignore_eos also disables stop_token_ids; canonically it disables EOS only.
    plan = translate_sampling(SamplingParams(stop_token_ids=(5, 3), ignore_eos=True))
    assert plan.watched_stop_token_ids == (3, 5) and plan.streamed
    assert "stop_token_ids" not in plan.sampling_params
    plain = translate_sampling(SamplingParams(stop_token_ids=(5, 3)))
    assert plain.watched_stop_token_ids == () and not plain.streamed


def test_auto_dtype_is_the_checkpoints_not_sglangs_half_precision(tmp_path):
    """SGLang's own "auto" serves a float32 checkpoint in float16; the plugin's is the checkpoint's."""
    (tmp_path / "config.json").write_text('{"dtype": "float32"}')
    assert engine_kwargs(GeneratorConfig(model=str(tmp_path)))["dtype"] == "float32"
    assert engine_kwargs(GeneratorConfig(model="/not/a/folder"))["dtype"] == "auto"
