"""The vLLM backend's weight updates through vLLM's own weight-transfer API.

Two ways carry an update from the engine's process into vLLM's workers:

``weight_transfer``
    vLLM's phased API (``AsyncLLM.init_weight_transfer_engine``, ``start_weight_update``,
    ``update_weights``, ``finish_weight_update``) with the ``"skyrl"`` weight-transfer engine in the
    workers (:mod:`skyrl_backend_vllm.weight_transfer.worker`); the request crosses as JSON.
``worker_extension``
    the plugin's worker extension reached through ``collective_rpc``
    (:mod:`skyrl_backend_vllm.worker_extension`); the only way on vLLM releases without the phased
    API.

:func:`choose_path` picks the default measured faster on each platform (docs/benchmarks.md, "The
vLLM backend's two weight paths"), where the installed vLLM has the API; ``SKYRL_VLLM_WEIGHT_PATH``
overrides it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from skyrl_backends.errors import ConfigError
from skyrl_backends.types import WeightSyncInitInfo, WeightUpdateRequest
from skyrl_backends.weight_sync.phases import BACKEND, init_info_to_json, update_info_to_json

from skyrl_backend_vllm.weight_transfer import native_api_available, register

PATH_ENV = "SKYRL_VLLM_WEIGHT_PATH"
PATHS = ("weight_transfer", "worker_extension")
# Measured per platform (docs/benchmarks.md): on vLLM-CPU the weight-transfer API was 9% ahead
# (both paths end in the same full reload there); on an H200 (vLLM 0.26, a 1.5B model over CUDA IPC)
# the worker extension took 54 ms against 57-69 ms, pooled over two machine calls each.
DEFAULT_PATH: dict[str, str] = {"cpu": "weight_transfer", "cuda": "worker_extension"}


def choose_path(platform: str) -> str:
    """``weight_transfer`` or ``worker_extension``: ``$SKYRL_VLLM_WEIGHT_PATH`` if set, else the
    platform's default where the installed vLLM has the phased API, else the worker extension."""
    chosen = os.environ.get(PATH_ENV)
    if chosen is not None and chosen not in PATHS:
        raise ConfigError(PATH_ENV, f"got {chosen!r}; expected one of {list(PATHS)}")
    if chosen == "weight_transfer" and not native_api_available():
        raise ConfigError(PATH_ENV, "the installed vLLM has no weight-transfer engine API (AsyncLLM's "
                                    "start_weight_update ...): use 'worker_extension'")
    if chosen is not None:
        return chosen
    default = DEFAULT_PATH.get(platform, "worker_extension")
    if default == "weight_transfer" and not native_api_available():
        return "worker_extension"
    return default


def engine_kwargs() -> dict[str, Any]:
    """The engine arguments that put the ``"skyrl"`` weight-transfer engine into the workers."""
    register()  # and in this process, for engines that run their workers in it
    return {"weight_transfer_config": {"backend": BACKEND}}


class WeightTransferUpdates:
    """Drives one AsyncLLM's phases. In-process tensors (``strategy="tensors"``) travel through
    shared memory (CPU tensors) or CUDA IPC (CUDA tensors), with senders kept for the next update."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._senders: dict[str, Any] = {}

    async def init(self, init_info: WeightSyncInitInfo) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info_to_json(init_info)))

    async def apply(self, request: WeightUpdateRequest) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        if request.strategy == "tensors":
            request = self._through_memory(request)
        await self.engine.start_weight_update()
        try:
            await self.engine.update_weights(WeightTransferUpdateRequest(update_info=update_info_to_json(request)))
        except BaseException:
            # A chunk the workers refused ended their update already (finishing it again fails,
            # quietly here); one that failed before reaching them left it open: close it.
            with contextlib.suppress(Exception):
                await self.engine.finish_weight_update()
            raise
        await self.engine.finish_weight_update()

    def _through_memory(self, request: WeightUpdateRequest) -> WeightUpdateRequest:
        from skyrl_backends.weight_sync import make_sender
        from skyrl_backends.weight_sync.chunks import plan

        tensors = list(request.payload or [])
        strategy = "cuda_ipc" if tensors and all(getattr(t, "is_cuda", False) for t in tensors) else "shared_memory"
        sender = self._senders.get(strategy)
        if sender is None:
            device = tensors[0].device if strategy == "cuda_ipc" else None
            sender = self._senders[strategy] = make_sender(strategy, device)
        layout = plan(list(zip(request.names, tensors, strict=True)),
                      dtype_for=dict(zip(request.names, request.dtypes, strict=True)))
        return WeightUpdateRequest(request.names, request.dtypes, request.shapes, strategy, sender.write(layout))

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()


__all__ = ["DEFAULT_PATH", "PATHS", "PATH_ENV", "WeightTransferUpdates", "choose_path", "engine_kwargs"]
