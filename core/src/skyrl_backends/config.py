"""The generator configuration, as the design's ``generator:`` section spells it.

Accepted as a mapping or a YAML file (either the section itself or a document holding a
``generator:`` key). Every key is checked: a misspelled one is an error naming it and suggesting the
closest valid key, because a silently ignored ``gpu_memory_utilisation`` costs a user an OOM hunt.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyrl_backends.errors import ConfigError
from skyrl_backends.sampling import SamplingParams

WEIGHT_SYNC_BACKENDS = ("nccl", "gloo", "broadcast", "cuda_ipc", "shared_memory", "tensors")


@dataclass
class GeneratorConfig:
    """One generator (a set of identical inference engines) and how to run it."""

    backend: str = "transformers"
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_inference_engines: int = 1
    inference_engine_tensor_parallel_size: int = 1
    inference_engine_pipeline_parallel_size: int = 1
    inference_engine_data_parallel_size: int = 1
    inference_engine_expert_parallel_size: int = 1
    gpu_memory_utilization: float = 0.8
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    weight_sync_backend: str = "nccl"
    enable_lora: bool = False
    max_lora_rank: int = 64
    max_loras: int = 4
    run_engines_locally: bool = True
    async_engine: bool = True
    batched: bool = True
    enable_http_endpoint: bool = False
    http_endpoint_host: str = "127.0.0.1"
    http_endpoint_port: int = 8000
    http_endpoint_api_key: str | None = None
    enable_sleep_mode: bool = True
    engine_init_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if isinstance(self.sampling_params, Mapping):
            self.sampling_params = SamplingParams.from_dict(self.sampling_params)
        if self.model is not None:
            self.model = os.fspath(self.model)
        self._validate()

    def _validate(self) -> None:
        positive = (
            "num_inference_engines", "inference_engine_tensor_parallel_size",
            "inference_engine_pipeline_parallel_size", "inference_engine_data_parallel_size",
            "inference_engine_expert_parallel_size", "max_num_batched_tokens", "max_num_seqs",
            "max_lora_rank", "max_loras",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError.out_of_range(name, value, "an integer >= 1")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError.out_of_range("gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")
        if self.weight_sync_backend not in WEIGHT_SYNC_BACKENDS:
            raise ConfigError.out_of_range("weight_sync_backend", self.weight_sync_backend,
                                           " / ".join(WEIGHT_SYNC_BACKENDS))
        if not isinstance(self.engine_init_kwargs, Mapping):
            raise ConfigError.out_of_range("engine_init_kwargs", self.engine_init_kwargs, "a mapping")
        if not 0 < int(self.http_endpoint_port) < 65536:
            raise ConfigError.out_of_range("http_endpoint_port", self.http_endpoint_port, "1-65535")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ConfigError.out_of_range("max_model_len", self.max_model_len, "None or an integer >= 1")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GeneratorConfig:
        """Build from a mapping; a ``generator:`` wrapper is unwrapped. Unknown keys are errors."""
        if isinstance(values, GeneratorConfig):
            return values
        if set(values) == {"generator"}:
            values = values["generator"]
        if not isinstance(values, Mapping):
            raise ConfigError("generator", f"expected a mapping, got {type(values).__name__}.")
        names = set(cls.field_names())
        for key in values:
            if key not in names:
                raise ConfigError.unknown_key(str(key), names, "the generator config")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> GeneratorConfig:
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ConfigError("generator", f"{path} must hold a mapping, got {type(data).__name__}.")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> GeneratorConfig:
        for key in changes:
            if key not in self.field_names():
                raise ConfigError.unknown_key(key, self.field_names(), "the generator config")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["sampling_params"] = self.sampling_params.to_dict()
        values["engine_init_kwargs"] = dict(self.engine_init_kwargs)
        return values


def load_config(source: GeneratorConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
                **overrides: Any) -> GeneratorConfig:
    """A GeneratorConfig from any accepted source, with keyword overrides applied on top."""
    if source is None:
        config = GeneratorConfig.from_dict(overrides) if overrides else GeneratorConfig()
        return config
    if isinstance(source, GeneratorConfig):
        config = source
    elif isinstance(source, Mapping):
        config = GeneratorConfig.from_dict(source)
    else:
        config = GeneratorConfig.from_yaml(source)
    return config.replace(**overrides) if overrides else config
