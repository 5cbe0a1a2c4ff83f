"""A weight loader that runs in SGLang's scheduler: colocated updates replayed as one fused copy.

SGLang calls a loader named in its ``custom_weight_loader`` server argument when an
``update_weights_from_tensor`` request names it as ``load_format``. The plugin names this one for
CUDA IPC updates from a sender in the engine's own process whose buckets it keeps for a whole
generation (:func:`skyrl_backends.weight_sync.cuda_ipc.keeps_buffers`): the scheduler then opens the
same buckets at every update, and the model's ``load_weights`` is recorded once and replayed
(:mod:`skyrl_backends.weight_sync.replay`). A load that is not replayable runs as SGLang's own.

The plugin hands SGLang whole buckets, not a view per tensor (:func:`bucket_pairs`): SGLang shares
each tensor with its scheduler by a CUDA IPC handle and event of its own, so four 1 GiB buckets
cross where 338 tensors of a 1.5B model would. Each pair's name carries its bucket's manifest
(written by the plugin from a validated request), from which this loader cuts the views again.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

import torch
from skyrl_backends.weight_sync import replay
from skyrl_backends.weight_sync.chunks import unpack
from skyrl_backends.weight_sync.manifest import BucketManifest

LOADER = f"{__name__}.load_weights"
SERVER_ARG = "custom_weight_loader"
BUCKET_PREFIX = "skyrl.bucket:"  # a pair's name that carries its bucket's manifest (JSON)
_replayed: weakref.WeakKeyDictionary[torch.nn.Module, replay.ReplayedLoad] = weakref.WeakKeyDictionary()
# The views cut from the last update's buckets, by each pair's name and buffer address.
_last_views: tuple[list[tuple[str, int]], list[tuple[str, torch.Tensor]]] | None = None


# The names written for the last update's manifests: the same layout (the same manifest objects,
# see skyrl_backends.weight_sync.manifest.planned_once) at every step gets the same names.
_last_names: tuple[tuple[BucketManifest, ...], list[str]] | None = None


def bucket_pairs(buckets: list[tuple[BucketManifest, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs that carry whole buckets to :func:`load_weights`."""
    global _last_names
    manifests = tuple(manifest for manifest, _ in buckets)
    if _last_names is None or _last_names[0] != manifests:
        _last_names = (manifests, [BUCKET_PREFIX + json.dumps(manifest.to_json(), separators=(",", ":"))
                                   for manifest in manifests])
    return list(zip(_last_names[1], (buffer for _, buffer in buckets), strict=True))


def load_weights(model: torch.nn.Module, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    replayed = _replayed.get(model)
    if replayed is None:
        # Whether the load is replayed, or why not, is said even where SGLang logs only errors.
        logging.getLogger(replay.__name__).setLevel(logging.INFO)
        replayed = _replayed[model] = replay.ReplayedLoad(lambda: replay.parameters_and_buffers(model))
    replayed.load(_views(named_tensors), model.load_weights)


def _views(named_tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the buckets, as views (the same view objects while a bucket is the same)."""
    global _last_views
    key = [(name, buffer.data_ptr()) for name, buffer in named_tensors]
    if _last_views is not None and _last_views[0] == key:
        return _last_views[1]
    views = []
    for name, buffer in named_tensors:
        if not name.startswith(BUCKET_PREFIX):
            views.append((name, buffer))
            continue
        views.extend(unpack(BucketManifest.from_trusted_json(json.loads(name[len(BUCKET_PREFIX):])), buffer))
    _last_views = (key, views)
    return views


def register(kwargs: dict[str, Any]) -> None:
    """Add this loader to the ``sglang.Engine`` keyword arguments (beside any the user named)."""
    loaders = list(kwargs.get(SERVER_ARG) or [])
    if LOADER not in loaders:
        kwargs[SERVER_ARG] = [*loaders, LOADER]
