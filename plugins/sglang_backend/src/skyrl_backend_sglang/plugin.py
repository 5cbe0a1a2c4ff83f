"""The ``sglang`` backend plugin: the entry point's target.

Importing this module imports neither SGLang nor torch: discovery and the sampling translation run
without the engine installed. SGLang is imported when an engine is created.
"""

from __future__ import annotations

from typing import Any

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig
from skyrl_backends.hookspecs import hookimpl
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import BackendInfo

from skyrl_backend_sglang.translation import MAX_TOP_LOGPROBS, SGLangSampling, is_cpu, translate_sampling
from skyrl_backend_sglang.versions import engine_labels_tokens

NAME = "sglang"
# 0.5.17 is the GPU authority (docs/parity.md); 0.5.23 runs the CPU smoke tests. Releases differ in
# the weight-update API (0.5.23 wraps tensor updates in begin/end_weight_update); the engine detects
# that by feature, not by version.
SUPPORTED_SGLANG = ">=0.5.17,<0.6"
# The plugin's `gpu` extra carries the same bounds (pyproject.toml). PyPI serves SGLang's CUDA build only.
INSTALL_SGLANG = "pip install 'skyrl-backend-sglang[gpu]'"


@hookimpl
def skyrl_backends_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        engine="sglang",
        supported_versions=SUPPORTED_SGLANG,
        plugin_api_versions=(1,),
        install_hint=INSTALL_SGLANG,
        description="SGLang (sglang.Engine) in token-in-token-out mode, with exact stop strings, "
                    "min_new_tokens and seeded sampling done by the plugin.",
        engine_import="sglang",
        engine_class="skyrl_backend_sglang.engine:SGLangEngine",
    )


@hookimpl
def skyrl_backends_capabilities(config: GeneratorConfig | None) -> Capabilities:
    """Everything on GPU. On SGLang's CPU path, memory release (it synchronizes CUDA) and LoRA (it
    pins host memory) crash, so sleep and LoRA are declared absent there."""
    cpu = is_cpu(config)
    return Capabilities(
        # SGLang has no sleep levels: releasing the "weights" tag always discards them, so both
        # levels are accepted and both discard (a trainer written for vLLM's levels still works).
        sleep_levels=() if cpu else (1, 2),
        discards_weights_at_level=None if cpu else 1,
        sleep_tags=not cpu,
        sleep_clears_prefix_cache=not cpu,  # the sleep hook flushes the radix cache before releasing
        lora=not cpu,
        # SGLang's own in-memory loading; the tensors arrive in this process, so not by broadcast
        # (which SGLang's scheduler receives itself, for base weights only).
        lora_from_tensors=("tensors", "shared_memory", "cuda_ipc") if not cpu and _loads_lora_from_tensors() else (),
        top_logprobs=True,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        stop_strings=True,
        min_new_tokens=True,
        seeded_sampling=True,
        min_p=True,
        repetition_penalty=True,
        prefix_caching=True,
        abort=True,
        native_pause=True,
        # SGLang's in-place (keep), retract (keep with recompute) and abort pauses; it has no wait.
        pause_modes=("abort",),
        recompute_on_resume=True,
        token_versions=engine_labels_tokens(config.engine_init_kwargs if config is not None else {}, cpu),
        # shared_memory and cuda_ipc arrive in this process (skyrl_backends.weight_sync) and go on to
        # SGLang's scheduler with update_weights_from_tensor; broadcast is SGLang's own receiver.
        weight_sync_strategies=("tensors", "shared_memory", "broadcast") if cpu
        else ("tensors", "shared_memory", "cuda_ipc", "broadcast"),
        broadcast_layouts=("per_tensor",),  # update_weights_from_distributed: one typed broadcast per tensor
        streaming=True,
    )


def _loads_lora_from_tensors() -> bool:
    """SGLang's load_lora_adapter_from_tensors with per-rank serialized tensors: 0.5.23 has it (0.5.17
    has no in-memory adapter loading). Read from the package's metadata: SGLang is not imported here."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("sglang")) >= Version("0.5.23")
    except PackageNotFoundError:
        return False


@hookimpl
def skyrl_backends_translate_sampling_params(params: SamplingParams, config: GeneratorConfig | None) -> SGLangSampling:
    """What ``async_generate`` receives and what the plugin does around it (see translation.py)."""
    return translate_sampling(params)


@hookimpl
def skyrl_backends_create_engine(config: GeneratorConfig) -> Any:
    from skyrl_backend_sglang.engine import SGLangEngine

    return SGLangEngine(config)
