"""The trainer's senders, made by strategy name."""

from __future__ import annotations

from typing import Any

import torch

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync import broadcast, cuda_ipc, shared_memory

STRATEGIES: tuple[str, ...] = ("tensors", shared_memory.STRATEGY, cuda_ipc.STRATEGY, broadcast.STRATEGY)
# The strategies whose sender make_sender makes, and that a trainer keeps across syncs.
KEPT_SENDER_STRATEGIES: tuple[str, ...] = (shared_memory.STRATEGY, cuda_ipc.STRATEGY)


def make_sender(strategy: str, device: torch.device | str | None = None) -> Any:
    """A reusable sender for a colocated strategy. Keep it across steps: it reuses its buffers (and
    so the engines' mappings and opened handles). For broadcast use
    :func:`~skyrl_backends.weight_sync.connect_broadcast`."""
    if strategy == shared_memory.STRATEGY:
        return shared_memory.SharedMemorySender()
    if strategy == cuda_ipc.STRATEGY:
        return cuda_ipc.CudaIpcSender(device)
    if strategy == broadcast.STRATEGY:
        raise WeightUpdateError({"strategy": "broadcast needs a process group: create its sender with "
                                             "`await connect_broadcast(engines, ...)`"})
    raise WeightUpdateError({"strategy": f"got {strategy!r}; expected one of {list(STRATEGIES)}"})


def sender_for(strategy: str, sender: Any = None) -> Any:
    """``sender`` when it sends by ``strategy`` (else a WeightUpdateError naming both), or a new
    sender for ``strategy`` when none is given (the caller then closes it)."""
    if sender is None:
        return make_sender(strategy)
    if sender.strategy != strategy:
        raise WeightUpdateError({"sender": f"is a {sender.strategy!r} sender but strategy is {strategy!r}"})
    return sender
