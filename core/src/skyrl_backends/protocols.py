"""The engine API as a type: what every kind of engine a trainer holds implements.

:class:`Engine` is written once, here. Its implementations are the in-process facade
(:class:`skyrl_backends.engine.InferenceEngine`), the Ray actor and its proxy
(:mod:`skyrl_backends.ray_wrapper`) and the client over a pool of engines
(:class:`skyrl_backends.client.InferenceEngineClient`); the client and weight sync are typed against
it, so a new kind of engine (one in another process, on another machine) is added in one file and
works everywhere. ``core/tests/test_engine_protocol.py`` checks that every implementation's
signatures match this one.

Every method that may wait on the engine is ``async``; what is fixed for an engine's life
(``backend``, ``capabilities``, parallel sizes, engine version) is read without awaiting.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from skyrl_backends.capabilities import Capabilities
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import (
    GenerateOutput,
    GenerateRequest,
    ParallelSizes,
    PauseMode,
    StreamChunk,
    TensorSpec,
    WeightSyncInitInfo,
    WeightUpdateRequest,
)

Prompts = GenerateRequest | Sequence[Sequence[int]]
SamplingInput = SamplingParams | Mapping[str, Any] | None


@runtime_checkable
class Engine(Protocol):
    """One engine, or something that stands for engines (a client over a pool)."""

    backend: str
    capabilities: Capabilities
    weight_version: int

    @property
    def closed(self) -> bool: ...

    def parallel_sizes(self) -> ParallelSizes: ...

    def engine_version(self) -> str | None: ...

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, request: Prompts, sampling_params: SamplingInput = None,
                       **request_fields: Any) -> GenerateOutput:
        """Token ids in, completions out, prompt-major (``n`` per prompt)."""
        ...

    def generate_stream(self, request: Prompts, sampling_params: SamplingInput = None,
                        **request_fields: Any) -> AsyncIterator[StreamChunk]:
        """Like :meth:`generate`, as :class:`StreamChunk` s while tokens are produced."""
        ...

    async def abort(self, request_ids: Sequence[str] | None = None) -> None: ...

    async def pause_generation(self, mode: PauseMode = "keep", *, recompute: bool = False) -> None:
        """Pause: ``"abort"`` ends in-flight requests with their partial output, ``"wait"`` lets
        them finish, ``"keep"`` freezes them (with ``recompute``, their caches are recomputed with the
        new weights on resume); new requests wait until :meth:`resume_generation`."""
        ...

    async def resume_generation(self) -> None: ...

    # -- memory ----------------------------------------------------------------------------------
    async def sleep(self, tags: Sequence[str] | None = None, level: int = 1, *, abort_first: bool = True,
                    drain_timeout: float = 5.0) -> None: ...

    async def wake_up(self, tags: Sequence[str] | None = None) -> None: ...

    # -- weights ---------------------------------------------------------------------------------
    async def weight_specs(self) -> dict[str, TensorSpec]:
        """Every updatable parameter by name (Hugging Face naming)."""
        ...

    async def validate_weight_update(self, request: WeightUpdateRequest) -> None:
        """Raise :class:`~skyrl_backends.errors.WeightUpdateError` if ``request`` would be rejected."""
        ...

    async def init_weight_update_communicator(
            self, init_info: WeightSyncInitInfo | Sequence[WeightSyncInitInfo]) -> None: ...

    async def update_named_weights(self, request: WeightUpdateRequest) -> int:
        """Apply a validated update atomically; returns the new weight version."""
        ...

    async def update_weights_from_tensors(self, named_tensors: Sequence[tuple[str, Any]]) -> int: ...

    # -- LoRA, cache, lifecycle ------------------------------------------------------------------
    async def load_lora_adapter(self, lora_name: str, lora_path: str | os.PathLike[str],
                                pinned: bool = False) -> None: ...

    async def validate_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                                 request: WeightUpdateRequest) -> None:
        """Raise if :meth:`load_lora_adapter_from_tensors` would refuse the adapter."""
        ...

    async def load_lora_adapter_from_tensors(self, lora_name: str, lora_config: Mapping[str, Any],
                                             request: WeightUpdateRequest, pinned: bool = False) -> int:
        """Load or replace an adapter sent as tensors (PEFT naming, ``lora_config`` a LoraConfig as
        JSON); returns the adapter's new version."""
        ...

    async def unload_lora_adapter(self, lora_name: str) -> None: ...

    async def reset_prefix_cache(self) -> None: ...

    async def teardown(self) -> None: ...


# The methods an implementation must define with the protocol's signature (the signature test's list).
ENGINE_METHODS: tuple[str, ...] = tuple(
    name for name, value in vars(Engine).items() if callable(value) and not name.startswith("_"))

__all__ = ["ENGINE_METHODS", "Engine"]
