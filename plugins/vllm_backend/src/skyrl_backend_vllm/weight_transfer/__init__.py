"""skyrl's weight-sync strategies as a vLLM weight-transfer backend, named ``"skyrl"``.

vLLM (from the releases with a weight-transfer engine API, 0.32 here) moves weights from a trainer
into its workers in phases (``init_weight_transfer_engine``, then ``start_weight_update``,
``update_weights``, ``finish_weight_update``) through a *weight-transfer engine* chosen with
``--weight-transfer-config '{"backend": NAME}'``, with a trainer-side engine to match; both come from
registries that exist for backends like this one. Registered here:

* worker side, :class:`~skyrl_backend_vllm.weight_transfer.worker.SkyRLWeightTransferEngine`: runs
  in every vLLM worker and receives skyrl's shared-memory, broadcast (gloo or NCCL) and CUDA IPC
  transfers, validated before a parameter changes;
* trainer side, :class:`~skyrl_backend_vllm.weight_transfer.trainer.SkyRLTrainerWeightTransferEngine`
  with :class:`~skyrl_backend_vllm.weight_transfer.trainer.SkyRLTrainerInitInfo`: sends them through
  any of vLLM's weight-sync clients (``HTTPVLLMWeightSyncClient``, ``RayVLLMWeightSyncClient``).

The payloads are skyrl's wire format (:mod:`skyrl_backends.weight_sync.phases`), so the same trainer
also drives ``skyrl-backends serve`` over any backend. vLLM loads this package's :func:`register`
in every process through the ``vllm.general_plugins`` entry point; a trainer calls it once before
``WeightTransferTrainerFactory.trainer_init`` (importing the trainer module does).
"""

from __future__ import annotations

import logging

from skyrl_backends.weight_sync.phases import BACKEND

logger = logging.getLogger(__name__)

_WORKER = ("skyrl_backend_vllm.weight_transfer.worker", "SkyRLWeightTransferEngine")
_TRAINER = ("skyrl_backend_vllm.weight_transfer.trainer", "SkyRLTrainerWeightTransferEngine")


def register() -> None:
    """Register the ``"skyrl"`` backend with vLLM's weight-transfer registries (worker and trainer
    side), lazily (nothing heavy is imported). Safe to call again; does nothing on a vLLM without
    the registries."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # a vLLM release before the weight-transfer engine API
        return
    _register(WeightTransferEngineFactory, *_WORKER)
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    except ImportError:  # releases with a worker registry but no trainer-side engines
        return
    _register(WeightTransferTrainerFactory, *_TRAINER)


def _register(factory: type, module: str, name: str) -> None:
    try:
        factory.register_engine(BACKEND, module, name)
    except ValueError:  # already registered (this process imported the plugin twice)
        pass


def native_api_available() -> bool:
    """Whether the installed vLLM has the phased weight-transfer API the plugin's engines can use:
    the worker registry and ``AsyncLLM``'s four phases."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:
        return False
    phases = ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update")
    return callable(getattr(WeightTransferEngineFactory, "register_engine", None)) and all(
        callable(getattr(AsyncLLM, name, None)) for name in phases)


__all__ = ["BACKEND", "native_api_available", "register"]
