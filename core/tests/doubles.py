"""Test doubles for unit tests of the core's own logic (discovery, facade bookkeeping).

``ArithmeticEngineDouble`` is not a backend and never stands in for one in the conformance suite: it
"generates" by counting up from the last prompt token, so the facade's ordering, expansion, state and
validation rules can be checked without an engine.
"""

from __future__ import annotations

from typing import Any

from skyrl_backends import hookimpl
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.types import (
    BackendInfo,
    Completion,
    GenerateOutput,
    GenerateRequest,
    TensorSpec,
    WeightUpdateRequest,
)

DOUBLE_CAPABILITIES = Capabilities(sleep_levels=(1, 2), discards_weights_at_level=2, sleep_tags=True, lora=True,
                                   top_logprobs=True, max_top_logprobs=5, abort=True,
                                   weight_sync_strategies=("tensors",))


class ArithmeticEngineDouble:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.calls: list[tuple[str, Any]] = []
        self.offset = 1
        self.update_failure: Exception | None = None  # raised by the next weight update, if set
        # What the double serves; a test may replace it before the facade first asks.
        self.specs = [TensorSpec("w", (2, 2), "float32"), TensorSpec("b", (2,), "float32")]

    @hookimpl
    async def skyrl_backends_generate(self, request: GenerateRequest) -> GenerateOutput:
        self.calls.append(("generate", request))
        n = request.sampling_params.max_generate_length
        seed = request.sampling_params.seed or 0
        return GenerateOutput([
            Completion(token_ids=[p[-1] + self.offset * (i + 1) + seed for i in range(n)], finish_reason="length")
            for p in request.prompt_token_ids])

    @hookimpl
    def skyrl_backends_weight_specs(self) -> list[TensorSpec]:
        return list(self.specs)

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request: WeightUpdateRequest) -> None:
        self.calls.append(("update", request.names))
        failure, self.update_failure = self.update_failure, None
        if failure is not None:
            raise failure

    @hookimpl
    async def skyrl_backends_sleep(self, tags: list[str], level: int) -> None:
        self.calls.append(("sleep", (tags, level)))

    @hookimpl
    async def skyrl_backends_wake_up(self, tags: list[str]) -> None:
        self.calls.append(("wake", tags))

    @hookimpl
    async def skyrl_backends_abort(self, request_ids: list[str] | None) -> None:
        self.calls.append(("abort", request_ids))

    @hookimpl
    async def skyrl_backends_load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        self.calls.append(("load_lora", lora_name))

    @hookimpl
    async def skyrl_backends_unload_lora_adapter(self, lora_name: str) -> None:
        self.calls.append(("unload_lora", lora_name))

    @hookimpl
    def skyrl_backends_teardown(self) -> None:
        self.calls.append(("teardown", None))


class DoublePlugin:
    """A backend plugin object whose engine is the arithmetic double."""

    def __init__(self, name: str = "double", capabilities: Capabilities = DOUBLE_CAPABILITIES,
                 engine: str = "pluggy", supported: str = ">=1") -> None:
        self.name, self.caps, self.engine, self.supported = name, capabilities, engine, supported

    @hookimpl
    def skyrl_backends_backend_info(self) -> BackendInfo:
        return BackendInfo(name=self.name, engine=self.engine, supported_versions=self.supported)

    @hookimpl
    def skyrl_backends_capabilities(self) -> Capabilities:
        return self.caps

    @hookimpl
    def skyrl_backends_translate_sampling_params(self, params: Any) -> dict:
        return params.to_dict()

    @hookimpl
    def skyrl_backends_create_engine(self, config: Any) -> ArithmeticEngineDouble:
        return ArithmeticEngineDouble(config)


class PrefixCachingEngineDouble(ArithmeticEngineDouble):
    """The arithmetic double with a prefix cache to reset (the reset is only recorded)."""

    @hookimpl
    async def skyrl_backends_reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache", None))


class PrefixCachingDoublePlugin(DoublePlugin):
    @hookimpl
    def skyrl_backends_create_engine(self, config: Any) -> PrefixCachingEngineDouble:
        return PrefixCachingEngineDouble(config)
