"""The backend hooks: what the entry point points at. Importing this module must stay cheap, so the
engine (and torch) is imported only when an engine is created."""

from __future__ import annotations

from typing import Any

from skyrl_backends import BackendInfo, Capabilities, GeneratorConfig, SamplingParams, hookimpl


@hookimpl
def skyrl_backends_backend_info() -> BackendInfo:
    # plugin_api_versions: the versions of skyrl_backends' plugin API this file was written for.
    return BackendInfo(name="minimal", engine="transformers", supported_versions=">=4.56,<6",
                       plugin_api_versions=(1,),
                       description="Plain forward passes, no KV cache: small enough to read in one sitting.",
                       # Named so the engine's hooks are checked before an engine starts.
                       engine_class="skyrl_backend_minimal.engine:MinimalEngine")


@hookimpl
def skyrl_backends_capabilities(config: GeneratorConfig | None) -> Capabilities:
    # Declare only what the engine really does; everything else is reported as unsupported by the
    # conformance suite (and refused by the engine facade) instead of being silently ignored.
    return Capabilities(abort=True, weight_sync_strategies=("tensors",))


@hookimpl
def skyrl_backends_translate_sampling_params(params: SamplingParams, config: GeneratorConfig | None) -> Any:
    # The engine reads canonical parameters directly. The facade has already refused every
    # parameter whose capability is declared absent (stop strings, seed, min_p, ...); what this
    # returns reaches skyrl_backends_generate as ``engine_params``.
    return params


@hookimpl
def skyrl_backends_create_engine(config: GeneratorConfig) -> Any:
    from skyrl_backend_minimal.engine import MinimalEngine

    return MinimalEngine(config)
