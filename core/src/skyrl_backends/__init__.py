"""skyrl_backends: inference-engine backends for RL trainers, as plugins.

A trainer selects an engine by name and drives it through one async API::

    import skyrl_backends
    engine = skyrl_backends.create_engine("transformers", model="/path/to/model")
    output = await engine.generate([[1, 2, 3]], {"max_generate_length": 16, "logprobs": 0})

Backends are separate distributions (``skyrl-backend-transformers``, ``skyrl-backend-vllm``,
``skyrl-backend-sglang``) found through the ``skyrl_backends`` entry-point group.
"""

from skyrl_backends.api import DEFAULT_BACKEND, create_engine, create_engines, list_backends
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.config import GeneratorConfig, load_config
from skyrl_backends.discovery import register_backend, unregister_backend
from skyrl_backends.engine import InferenceEngine
from skyrl_backends.errors import (
    BackendLoadError,
    BackendNotFoundError,
    ConfigError,
    EngineAsleepError,
    EngineClosedError,
    EngineDeadError,
    EngineStateError,
    EngineVersionError,
    LoraAdapterError,
    PluginAPIVersionError,
    RemoteEngineError,
    SamplingParamsError,
    SkyRLBackendsError,
    UnsupportedCapabilityError,
    WeightsNotLoadedError,
    WeightUpdateError,
)
from skyrl_backends.hookspecs import PLUGIN_API_VERSION, hookimpl
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import (
    BackendInfo,
    Completion,
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    PauseMode,
    TensorSpec,
    TokenVersions,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKEND", "PLUGIN_API_VERSION", "BackendInfo", "BackendLoadError", "BackendNotFoundError",
    "Capabilities", "Completion",
    "ConfigError", "EngineAsleepError", "EngineClosedError", "EngineDeadError", "EngineStateError",
    "EngineVersionError", "GenerateOutput", "GenerateRequest", "GeneratorConfig", "InferenceEngine",
    "LoraAdapterError", "ParallelSizes", "PauseMode", "PluginAPIVersionError", "RemoteEngineError",
    "SamplingParams", "SamplingParamsError", "SkyRLBackendsError", "TensorSpec", "TokenVersions",
    "UnsupportedCapabilityError", "WeightSyncInitInfo", "WeightUpdateRequest", "WeightUpdateError",
    "WeightsNotLoadedError", "create_engine", "create_engines", "hookimpl", "list_backends", "load_config",
    "register_backend", "unregister_backend",
]
