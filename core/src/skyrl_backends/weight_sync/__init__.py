"""Weight synchronisation from a trainer to engines of any backend.

Trainer side: :func:`sync_weights` (one call, strategy by name; collective over the ranks of a
sharded trainer), :func:`sync_lora_adapter` (a LoRA adapter from tensors), the senders, and
:func:`iter_weight_chunks` (a model as packed byte buckets). Engine side, for backends:
:data:`RECEIVER_STRATEGIES`, :func:`make_receiver` and :func:`load_named_tensors` (or
:func:`receive_named_tensors`, the whole update at once).
The wire format and its validation (torch-free) live in :mod:`skyrl_backends.weight_sync.manifest`.

This package imports torch; the rest of ``skyrl_backends`` does not need it. Names are resolved
lazily, so ``import skyrl_backends.weight_sync.manifest`` does not import torch either.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_receiver": "receive", "receive_named_tensors": "receive", "load_named_tensors": "receive",
    "receiver_strategies": "receive",
    "WeightChunk": "chunks", "iter_weight_chunks": "chunks", "named_tensors": "chunks",
    "DEFAULT_BUCKET_BYTES": "chunks",
    "SharedMemorySender": "shared_memory", "CudaIpcSender": "cuda_ipc", "BroadcastSender": "broadcast",
    "sync_weights": "sync", "connect_broadcast": "sync", "make_sender": "senders", "STRATEGIES": "senders",
    "sync_lora_adapter": "adapters",
    "request_to_json": "manifest", "request_from_json": "manifest",
}

__all__ = ["RECEIVER_STRATEGIES", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "RECEIVER_STRATEGIES":
        # Strategies this process can receive: "shared_memory", "broadcast", and "cuda_ipc" with CUDA.
        value = importlib.import_module(f"{__name__}.receive").receiver_strategies()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
