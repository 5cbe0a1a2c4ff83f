"""Pushing the trainer's weights into the engines, once per training step.

A thin layer over :func:`skyrl_backends.weight_sync.sync_weights`: it picks the transfer strategy
once and keeps one sender for the whole run, so the shared-memory segments (or CUDA IPC buffers)
are allocated at the first sync and reused by every later one.

Strategy ``"auto"`` takes the colocated transport the trainer would use with engines in other
processes: CUDA IPC when the trainer's model is on a GPU, else shared memory, when every engine
declares it; otherwise in-process tensors. Each engine checks every name, shape and dtype before
applying anything, and tensors are cast to the dtype each engine holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from skyrl_backends.weight_sync import make_sender, sync_weights

COLOCATED_STRATEGIES = ("cuda_ipc", "shared_memory")


def choose_strategy(requested: str, engine_strategies: Sequence[Sequence[str]], trainer_device: torch.device) -> str:
    """The strategy to use with engines declaring ``engine_strategies`` (one tuple per engine)."""
    common = set.intersection(*(set(s) for s in engine_strategies)) if engine_strategies else set()
    if requested != "auto":
        if requested not in common:
            raise ValueError(f"weight sync strategy {requested!r} is not supported by every engine; "
                             f"they all support: {sorted(common) or 'none'}. Use --weight-sync auto.")
        return requested
    preferred = ["cuda_ipc", "shared_memory"] if trainer_device.type == "cuda" else ["shared_memory"]
    for strategy in [*preferred, "tensors"]:
        if strategy in common:
            return strategy
    raise ValueError(f"the engines share no weight sync strategy the trainer can use (they support "
                     f"{sorted(common) or 'none'})")


class WeightSync:
    """Sends a model to a set of engines (an engine, a client, or a list of them), step after step."""

    def __init__(self, strategy: str, trainer_device: torch.device | str = "cpu") -> None:
        self.strategy = strategy
        self._sender: Any = make_sender(strategy, trainer_device) if strategy in COLOCATED_STRATEGIES else None

    async def push(self, engines: Any, model: torch.nn.Module) -> int:
        """Send every parameter of ``model`` in one atomic update; returns the weight version the
        engines serve afterwards (the lowest, should they differ)."""
        versions = await sync_weights(engines, model, strategy=self.strategy, sender=self._sender)
        return min(versions)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
