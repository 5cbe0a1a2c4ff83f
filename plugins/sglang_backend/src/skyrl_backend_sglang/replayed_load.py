"""A weight loader that runs in SGLang's scheduler: colocated updates replayed as one fused copy.

SGLang calls a loader named in its ``custom_weight_loader`` server argument when an
``update_weights_from_tensor`` request names it as ``load_format``. The plugin names this one for
CUDA IPC updates from a sender in the engine's own process whose buckets it keeps for a whole
generation (:func:`skyrl_backends.weight_sync.cuda_ipc.keeps_buffers`): the scheduler then opens the
same buckets at every update, and the model's ``load_weights`` is recorded once and replayed
(:mod:`skyrl_backends.weight_sync.replay`). A load that is not replayable runs as SGLang's own.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from skyrl_backends.weight_sync.replay import ReplayedLoad

logger = logging.getLogger(__name__)

LOADER = f"{__name__}.load_weights"
SERVER_ARG = "custom_weight_loader"
_replayed: weakref.WeakKeyDictionary[torch.nn.Module, ReplayedLoad] = weakref.WeakKeyDictionary()


def load_weights(model: torch.nn.Module, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    replayed = _replayed.get(model)
    if replayed is None:
        replayed = _replayed[model] = ReplayedLoad(lambda: _tensors_of(model))
    refused_before = replayed.refused
    replayed.load(named_tensors, model.load_weights)
    if replayed.refused is not None and replayed.refused != refused_before:
        logger.warning("skyrl: this model's weight load is not replayed (%s); each update runs it in full",
                       replayed.refused)


def _tensors_of(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def register(kwargs: dict[str, Any]) -> None:
    """Add this loader to the ``sglang.Engine`` keyword arguments (beside any the user named)."""
    loaders = list(kwargs.get(SERVER_ARG) or [])
    if LOADER not in loaders:
        kwargs[SERVER_ARG] = [*loaders, LOADER]
