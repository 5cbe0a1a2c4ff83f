"""The generator configuration, as the design's ``generator:`` section spells it.

Accepted as a mapping, a YAML file (either the section itself or a document holding a
``generator:`` key) or command-line overrides in the design's dotted syntax
(``generator.backend=sglang``, :func:`parse_overrides`). Every key and every value is checked by one
rule, derived from the field's type (:func:`check_field`): booleans are booleans (the string
``"false"`` is not), integers are integers, enumerations such as ``dtype`` take their listed values,
ranges are enforced; an error names the key, the value and what is accepted. A misspelled key is an
error suggesting the closest valid one, because a silently ignored ``gpu_memory_utilisation`` costs a
user an OOM hunt.

Whether the named backend is installed is checked where an engine is created
(:func:`skyrl_backends.create_engine`), not here: a configuration may describe engines that run on
another machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from skyrl_backends.errors import ConfigError
from skyrl_backends.sampling import SamplingParams

# The fields that describe engines served elsewhere (run_engines_locally false).
REMOTE_FIELDS = ("run_engines_locally", "remote_inference_engine_urls", "remote_inference_engine_api_key",
                 "remote_inference_engine_protocol")
RemoteProtocol = Literal["skyrl", "vllm", "sglang"]
WEIGHT_SYNC_BACKENDS = ("nccl", "gloo", "broadcast", "cuda_ipc", "shared_memory", "tensors")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
WeightSyncBackend = Literal["nccl", "gloo", "broadcast", "cuda_ipc", "shared_memory", "tensors"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_BACKEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _at_least(low: int) -> dict[str, Any]:
    return {"check": lambda v: v >= low, "accepted": f"an integer >= {low}"}


def _within(low: float, high: float) -> dict[str, Any]:
    return {"check": lambda v: low < v <= high, "accepted": f"a number in ({low}, {high}]"}


def _matching(pattern: re.Pattern[str], accepted: str) -> dict[str, Any]:
    return {"check": lambda v: bool(pattern.match(v)), "accepted": accepted}


@dataclass
class GeneratorConfig:
    """One generator (a set of identical inference engines) and how to run it.

    Field metadata narrows a type: ``check`` is a predicate on a value of the right type and
    ``accepted`` says in words what it accepts."""

    backend: str = field(default="transformers", metadata=_matching(
        _BACKEND_NAME, "a backend name such as transformers, vllm or sglang (see `skyrl-backends plugins`)"))
    model: str | None = None
    tokenizer: str | None = None
    # "auto": the dtype the checkpoint declares, float32 when it declares none, on every backend
    # (skyrl_backends.checkpoint.served_dtype; not vLLM's or SGLang's own "auto", which halves float32).
    dtype: Dtype = "auto"
    device: str = field(default="auto", metadata=_matching(_DEVICE, "auto, cpu, cuda or cuda:N"))
    seed: int = field(default=0, metadata=_at_least(0))
    num_inference_engines: int = field(default=1, metadata=_at_least(1))
    inference_engine_tensor_parallel_size: int = field(default=1, metadata=_at_least(1))
    inference_engine_pipeline_parallel_size: int = field(default=1, metadata=_at_least(1))
    inference_engine_data_parallel_size: int = field(default=1, metadata=_at_least(1))
    inference_engine_expert_parallel_size: int = field(default=1, metadata=_at_least(1))
    gpu_memory_utilization: float = field(default=0.8, metadata=_within(0, 1))
    max_num_batched_tokens: int = field(default=8192, metadata=_at_least(1))
    max_num_seqs: int = field(default=1024, metadata=_at_least(1))
    max_model_len: int | None = field(default=None, metadata={"check": lambda v: v >= 1,
                                                              "accepted": "None or an integer >= 1"})
    enable_prefix_caching: bool = True
    weight_sync_backend: WeightSyncBackend = "nccl"
    enable_lora: bool = False
    max_lora_rank: int = field(default=64, metadata=_at_least(1))
    max_loras: int = field(default=4, metadata=_at_least(1))
    run_engines_locally: bool = True
    # With run_engines_locally false: one engine server per URL (`skyrl-backends serve`), as SkyRL
    # spells it ("10.0.0.2:8001" or a full http(s) URL); the key is sent to every one of them.
    remote_inference_engine_urls: list[str] = field(default_factory=list, metadata={
        "check": lambda v: all(u.strip() for u in v), "accepted": "a list of host:port or http(s):// URLs"})
    remote_inference_engine_api_key: str | None = None
    # What those servers are: `skyrl-backends serve` ("skyrl"), or an engine's own unmodified server,
    # `vllm serve` ("vllm") or SGLang's launch_server ("sglang"), driven through its HTTP API.
    remote_inference_engine_protocol: RemoteProtocol = "skyrl"
    async_engine: bool = True
    batched: bool = True
    enable_http_endpoint: bool = False
    http_endpoint_host: str = "127.0.0.1"
    http_endpoint_port: int = field(default=8000, metadata={"check": lambda v: 0 < v < 65536,
                                                            "accepted": "an integer in 1-65535"})
    http_endpoint_api_key: str | None = None
    enable_sleep_mode: bool = True
    engine_init_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))

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
        values["remote_inference_engine_urls"] = list(self.remote_inference_engine_urls)
        return values


def load_config(source: GeneratorConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
                **overrides: Any) -> GeneratorConfig:
    """A GeneratorConfig from any accepted source, with keyword overrides applied on top."""
    if source is None:
        return GeneratorConfig.from_dict(overrides) if overrides else GeneratorConfig()
    if isinstance(source, GeneratorConfig):
        config = source
    elif isinstance(source, Mapping):
        config = GeneratorConfig.from_dict(source)
    else:
        config = GeneratorConfig.from_yaml(source)
    return config.replace(**overrides) if overrides else config


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Command-line overrides in the design's dotted syntax, as a mapping for :func:`load_config`.

    ``generator.backend=sglang`` (the ``generator.`` prefix is optional), nested keys with dots
    (``generator.engine_init_kwargs.max_logprobs=5``, ``generator.sampling_params.temperature=0.7``).
    Values are read as YAML scalars, as in the config file: ``true``, ``8``, ``0.5``, ``[a, b]``,
    ``null``; they are then checked by the same rule as every other source."""
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        path = [part for part in key.strip().split(".") if part]
        if not sep or not path:
            raise ConfigError(item, "is not an override; write KEY=VALUE, e.g. generator.backend=sglang.")
        if path[0] == "generator":
            path = path[1:]
        if not path:
            raise ConfigError(item, "names no key; write generator.KEY=VALUE.")
        if path[0] not in GeneratorConfig.field_names():
            raise ConfigError.unknown_key(path[0], GeneratorConfig.field_names(), "the generator config")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(".".join(path), f"value {raw!r} is not valid YAML: {exc}") from None
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(".".join(path), "is set both as a value and as a mapping.")
        target[path[-1]] = value
    return values


# -- the one validation rule -------------------------------------------------------------------
_HINTS: dict[str, Any] | None = None


def _field_types() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(GeneratorConfig)
    return _HINTS


def check_field(name: str, value: Any) -> Any:
    """``value`` for field ``name`` if its type (and the field's narrowing) accepts it, converted
    where the conversion loses nothing (a mapping of sampling parameters, an int for a float);
    otherwise :class:`ConfigError` naming the field, the value and what is accepted."""
    spec = next(f for f in dataclasses.fields(GeneratorConfig) if f.name == name)
    annotation = _field_types()[name]
    value = _check_type(name, annotation, value)
    check: Callable[[Any], bool] | None = spec.metadata.get("check")
    if value is not None and check is not None and not check(value):
        raise ConfigError.out_of_range(name, value, spec.metadata["accepted"])
    return value


def _check_type(name: str, annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check_type(name, inner, value)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError.out_of_range(name, value, " / ".join(map(str, choices)))
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError.out_of_range(name, value, "true or false (a boolean, not a string or a number)")
        return value
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError.out_of_range(name, value, "an integer")
        return value
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError.out_of_range(name, value, "a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError.out_of_range(name, value, "a string")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError.out_of_range(name, value, "a mapping")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError.out_of_range(name, value, "a list")
        return [_check_type(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if annotation is SamplingParams:
        return value if isinstance(value, SamplingParams) else SamplingParams.from_dict(value)
    raise TypeError(f"GeneratorConfig.{name}: no validation rule for {annotation!r}")  # pragma: no cover

