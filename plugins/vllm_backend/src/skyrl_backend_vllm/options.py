"""The generator config -> keyword arguments of ``vllm.engine.arg_utils.AsyncEngineArgs``.

Pure (no vllm import). The canonical options map as the design describes; ``engine_init_kwargs``
is passed through and overrides the mapped values, except for the few arguments the plugin's own
contract depends on (:data:`RESERVED`), which it refuses with an explanation.

On CPU, vLLM sizes its KV cache from the environment variable ``VLLM_CPU_KVCACHE_SPACE`` (GiB)
rather than from ``gpu_memory_utilization``, refuses ``enable_sleep_mode`` and is only practical
without ``torch.compile``: :func:`engine_kwargs` handles all three.
"""

from __future__ import annotations

import os
from typing import Any

from skyrl_backends.checkpoint import served_dtype
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.errors import ConfigError

from skyrl_backend_vllm.engine_platform import Platform, detect_platform
from skyrl_backend_vllm.sampling import DEFAULT_MAX_LOGPROBS

WORKER_EXTENSION = "skyrl_backend_vllm.worker_extension.SkyRLWorkerExtension"
CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
SPAWN_ENV = "VLLM_WORKER_MULTIPROC_METHOD"
DEFAULT_CPU_KVCACHE_GIB = "1"

# Arguments the plugin sets itself because its behaviour depends on them.
RESERVED = {
    "worker_extension_cls": "the plugin's worker extension carries weight updates into the workers",
    "logprobs_mode": "log-probabilities must be raw ('raw_logprobs') to match a teacher-forced forward pass",
    "skip_tokenizer_init": "the engine detokenizes to apply stop strings and return text",
}


def engine_kwargs(config: GeneratorConfig, platform: Platform | None = None) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for ``config`` on ``platform`` (detected when None)."""
    platform = platform or detect_platform(config)
    if config.model is None or not os.path.isdir(config.model):
        # Weight updates are checked against the checkpoint's own tensor names and shapes, so the
        # model must be a local folder (nothing is downloaded).
        raise ConfigError("model", f"{config.model!r} is not a local Hugging Face model folder; download it first.")
    extra = dict(config.engine_init_kwargs)
    for key, why in RESERVED.items():
        if key in extra:
            raise ConfigError(f"engine_init_kwargs.{key}", f"is set by the vLLM backend itself: {why}. Remove it.")
    kwargs: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.tokenizer or config.model,
        "dtype": served_dtype(config.dtype, config.model),
        "seed": config.seed,
        "tensor_parallel_size": config.inference_engine_tensor_parallel_size,
        "pipeline_parallel_size": config.inference_engine_pipeline_parallel_size,
        "data_parallel_size": config.inference_engine_data_parallel_size,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs,
        "enable_prefix_caching": config.enable_prefix_caching,
        "enable_lora": config.enable_lora,
        "disable_log_stats": True,
        "worker_extension_cls": WORKER_EXTENSION,
        "logprobs_mode": "raw_logprobs",
        "skip_tokenizer_init": False,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.enable_lora:
        kwargs["max_lora_rank"] = config.max_lora_rank
        kwargs["max_loras"] = config.max_loras + spare_lora_slots(platform)
    kwargs.update(_expert_parallel(config))
    if platform == "cpu":
        # vLLM on CPU refuses sleep mode and ignores the GPU memory fraction; compilation only
        # slows start-up for the small models a CPU serves.
        kwargs["enforce_eager"] = True
        if extra.get("enable_sleep_mode"):
            raise ConfigError("engine_init_kwargs.enable_sleep_mode", "vLLM has no sleep mode on CPU. Remove it.")
    else:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = config.enable_sleep_mode
    kwargs.update(extra)
    return kwargs


def spare_lora_slots(platform: Platform) -> int:
    """Adapter slots vLLM gets beyond ``max_loras``, which the plugin never fills.

    vLLM's torch LoRA ops (its CPU path, vLLM-CPU 0.32) select each token's adapter weights by slot
    index, and a token without an adapter has index -1, which selects the *last* slot: once the last
    slot holds an adapter, base-model requests batched beside adapter requests are computed with that
    adapter (found by the conformance suite against ``vllm serve``, reproduced in process). vLLM fills
    slots first-free, so with one slot more than the adapters the plugin lets be loaded at once (it
    refuses one more than ``max_loras``) the last slot stays empty and adds nothing. vLLM's GPU kernels
    treat -1 as no adapter."""
    return 1 if platform == "cpu" else 0


def _expert_parallel(config: GeneratorConfig) -> dict[str, Any]:
    """vLLM has no free expert-parallel size: with expert parallelism on, experts are spread over
    every tensor- and data-parallel rank. So an EP size is accepted only when it equals TP x DP."""
    ep = config.inference_engine_expert_parallel_size
    if ep == 1:
        return {}
    ranks = config.inference_engine_tensor_parallel_size * config.inference_engine_data_parallel_size
    if ep != ranks:
        raise ConfigError.out_of_range(
            "inference_engine_expert_parallel_size", ep,
            f"1 or tensor x data parallel size ({ranks}): vLLM spreads experts over all of those ranks")
    return {"enable_expert_parallel": True}


def max_logprobs(config: GeneratorConfig | None) -> int:
    if config is None:
        return DEFAULT_MAX_LOGPROBS
    return int(config.engine_init_kwargs.get("max_logprobs", DEFAULT_MAX_LOGPROBS))


def prepare_process_environment(platform: Platform) -> None:
    """Environment the engine's processes inherit: a KV-cache size on CPU unless the user chose one,
    and on CUDA processes started with spawn unless the user chose otherwise. (Models are local
    folders, checked before this, so nothing needs the hub; whether this process may reach it is
    the caller's choice, not the plugin's.)"""
    if platform == "cpu":
        os.environ.setdefault(CPU_KVCACHE_ENV, DEFAULT_CPU_KVCACHE_GIB)
    else:
        # vLLM forks its engine core unless it sees CUDA initialized in this process; but a trainer
        # (or transformers) that only queried the device already makes a forked child fail with
        # "Cannot re-initialize CUDA in forked subprocess" (seen on the GPU machine).
        os.environ.setdefault(SPAWN_ENV, "spawn")
