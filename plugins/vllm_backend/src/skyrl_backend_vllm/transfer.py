"""Moving weight-update tensors from the engine's process into vLLM's worker processes.

vLLM's workers run in other processes, reached through ``collective_rpc``, whose arguments are
serialized with msgpack: a tensor passed directly arrives as a nested list. So tensors travel as
one of these *transfers* (plain dicts of bytes, strings and numbers), which
:mod:`skyrl_backend_vllm.worker_extension` turns back into tensors:

``shared_memory``
    CPU tensors (any machine): copied once into a POSIX shared-memory segment; the workers map it
    and copy out. The segment is unlinked as soon as the call returns.
``cuda_ipc``
    CUDA tensors (colocated trainer on the same GPU): CUDA IPC handles from
    ``torch.multiprocessing.reductions.reduce_tensor``, pickled; no copy until the worker loads.
``request``
    a :class:`~skyrl_backends.types.WeightUpdateRequest` of one of the core's weight-sync
    strategies (shared memory, broadcast, CUDA IPC), pickled; the worker receives it with
    :func:`skyrl_backends.weight_sync.load_named_tensors`.

Pickle is used only between this process and the engine's own workers, which the plugin starts.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Strategies handled here on every platform.
OWN_STRATEGIES = ("tensors",)
# The core's weight-sync strategies, received in the workers through its receivers. CUDA IPC needs a
# GPU in the worker. Named here rather than read from ``RECEIVER_STRATEGIES``, which imports torch
# and asks the *calling* process for CUDA, while what matters is the workers' platform.
CORE_STRATEGIES = ("shared_memory", "broadcast")
CORE_GPU_STRATEGIES = ("cuda_ipc",)


def supported_strategies(on_cpu: bool) -> tuple[str, ...]:
    """Weight-sync strategies the vLLM backend can receive on this platform."""
    if importlib.util.find_spec("skyrl_backends.weight_sync") is None:
        return OWN_STRATEGIES
    return (*OWN_STRATEGIES, *CORE_STRATEGIES, *(() if on_cpu else CORE_GPU_STRATEGIES))


@dataclass
class Transfer:
    """A transfer ready for ``collective_rpc``; :meth:`close` frees what it holds once the workers
    have answered."""

    message: dict[str, Any]
    _keep_alive: list[Any] = field(default_factory=list)
    _segment: Any = None

    def close(self) -> None:
        self._keep_alive.clear()
        if self._segment is not None:
            self._segment.close()
            self._segment.unlink()
            self._segment = None

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pack_tensors(names: Sequence[str], tensors: Sequence[Any]) -> Transfer:
    """A transfer for in-process tensors: CUDA IPC when every tensor is on a GPU, else shared memory."""
    if len(names) != len(tensors):
        raise ValueError(f"{len(names)} names for {len(tensors)} tensors")
    if tensors and all(getattr(t, "is_cuda", False) for t in tensors):
        return _pack_cuda_ipc(names, tensors)
    return _pack_shared_memory(names, tensors)


def pack_request(request: Any) -> Transfer:
    """A transfer for a request of one of the core's weight-sync strategies."""
    return Transfer({"kind": "request", "data": pickle.dumps(request)})


def _pack_cuda_ipc(names: Sequence[str], tensors: Sequence[Any]) -> Transfer:
    from torch.multiprocessing.reductions import reduce_tensor

    contiguous = [t.detach().contiguous() for t in tensors]
    handles = [(name, reduce_tensor(t)) for name, t in zip(names, contiguous)]
    # The tensors must outlive the call: the workers open their memory through the handles.
    return Transfer({"kind": "cuda_ipc", "data": pickle.dumps(handles)}, _keep_alive=contiguous)


def _pack_shared_memory(names: Sequence[str], tensors: Sequence[Any]) -> Transfer:
    from multiprocessing import shared_memory

    import torch

    flat = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    items, offset = [], 0
    for name, tensor, raw in zip(names, tensors, flat):
        nbytes = raw.numel()
        items.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes])
        offset += _aligned(nbytes)
    segment = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
        view = torch.frombuffer(segment.buf, dtype=torch.uint8)
        for (_, _, _, start, nbytes), raw in zip(items, flat):
            view[start:start + nbytes].copy_(raw)
        del view  # the buffer cannot be closed while a tensor still exports it
    except BaseException:
        segment.close()
        segment.unlink()
        raise
    return Transfer({"kind": "shared_memory", "segment": segment.name, "items": items}, _segment=segment)


def _aligned(nbytes: int, alignment: int = 64) -> int:
    """Offsets stay aligned so every dtype can be viewed in place."""
    return (nbytes + alignment - 1) // alignment * alignment
