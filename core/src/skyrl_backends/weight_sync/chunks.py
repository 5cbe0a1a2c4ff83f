"""Trainer side: turn a model into packed byte buckets (``WeightChunk``) ready to send.

A model, a state dict or an iterable of ``(name, tensor)`` becomes a list of named tensors; each is
converted to the dtype the engine holds, and consecutive tensors are packed into one contiguous
``uint8`` buffer per bucket of at most ``bucket_bytes`` (a larger tensor gets its own bucket), so one
IPC handle, one shared-memory segment or one collective moves many tensors at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync.manifest import DTYPE_ITEMSIZE, BucketManifest, plan_buckets

DEFAULT_BUCKET_BYTES = 1 << 30  # 1 GiB
DtypeFor = None | str | torch.dtype | Mapping[str, Any] | Callable[[str, torch.Tensor], Any]
Weights = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_ITEMSIZE:
        raise WeightUpdateError({"dtype": f"{dtype!r} is not allowed; allowed: {sorted(DTYPE_ITEMSIZE)}"})
    return getattr(torch, dtype)


def named_tensors(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a module (its state dict: parameters and persistent buffers, tied
    weights once), a state dict, or an iterable of pairs. Tensors are referenced, not copied."""
    if isinstance(weights, torch.nn.Module):
        items: Iterable[tuple[str, Any]] = _without_tied_aliases(weights, weights.state_dict(keep_vars=False))
    elif isinstance(weights, Mapping):
        items = weights.items()
    else:
        items = weights
    pairs = []
    for name, tensor in items:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError({str(name): f"expected (str, torch.Tensor), got ({type(name).__name__}, "
                                                f"{type(tensor).__name__})"})
        pairs.append((name, tensor.detach()))
    return pairs


def _without_tied_aliases(module: torch.nn.Module,
                          state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """A module's state dict lists a tied tensor under every name (``lm_head.weight`` beside
    ``model.embed_tokens.weight``); engines that load tied checkpoints hold it once, under the first
    name, and would reject the alias. Send each once.

    Aliases are read from the module's structure (a parameter or buffer registered under several
    names keeps its first), not from storage addresses: the parameters of a model sharded across
    ranks (FSDP2) are shards whose addresses differ from rank to rank, and every rank must drop the
    same names."""
    first = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    every = ({name for name, _ in module.named_parameters(remove_duplicate=False)}
             | {name for name, _ in module.named_buffers(remove_duplicate=False)})
    return [(name, tensor) for name, tensor in state.items() if name in first or name not in every]


def resolve_dtype_for(dtype_for: DtypeFor) -> Callable[[str, torch.Tensor], torch.dtype]:
    """``dtype_for`` as a function ``(name, tensor) -> target dtype``.

    None keeps each tensor's dtype; a dtype (or its name) converts everything; a mapping gives the
    dtype per name (e.g. built from the engine's weight specs), names not in it keep theirs; a
    callable is used as it is."""
    if dtype_for is None:
        return lambda name, tensor: tensor.dtype
    if isinstance(dtype_for, (str, torch.dtype)):
        target = to_torch_dtype(dtype_for)
        return lambda name, tensor: target
    if isinstance(dtype_for, Mapping):
        table = {k: to_torch_dtype(v) for k, v in dtype_for.items()}
        return lambda name, tensor: table.get(name, tensor.dtype)
    return lambda name, tensor: to_torch_dtype(dtype_for(name, tensor))


@dataclass
class WeightChunk:
    """One packed bucket: ``buffer`` (uint8, ``manifest.nbytes`` long) holds the tensors of ``manifest``."""

    manifest: BucketManifest
    buffer: torch.Tensor

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.manifest.tensors]

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from unpack(self.manifest, self.buffer)


@dataclass
class PackPlan:
    """Everything a sender needs before moving bytes: the tensors, their target dtypes, the buckets."""

    tensors: dict[str, torch.Tensor]
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    buckets: list[BucketManifest]


def plan(weights: Weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype_for: DtypeFor = None) -> PackPlan:
    pairs = named_tensors(weights)
    target = resolve_dtype_for(dtype_for)
    names, dtypes, shapes = [], [], []
    for name, tensor in pairs:
        names.append(name)
        dtypes.append(dtype_name(target(name, tensor)))
        shapes.append(tuple(tensor.shape))
    buckets = plan_buckets(list(zip(names, dtypes, shapes, strict=False)), bucket_bytes)
    return PackPlan(dict(pairs), names, dtypes, shapes, buckets)


def view(buffer: torch.Tensor, offset: int, dtype: str | torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` over ``buffer[offset:]`` (no copy)."""
    dtype = to_torch_dtype(dtype)
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def pack_into(buffer: torch.Tensor, manifest: BucketManifest, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy (and convert) every tensor of ``manifest`` into its place in ``buffer``."""
    copy_all([view(buffer, e.offset, e.dtype, e.shape) for e in manifest.tensors],
             [tensors[e.name] for e in manifest.tensors])


def copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """One fused multi-tensor copy instead of a copy per tensor: on a GPU a model of hundreds of
    tensors otherwise spends more time launching copies than moving bytes."""
    try:
        torch._foreach_copy_(destinations, sources, non_blocking=True)
    except (AttributeError, RuntimeError, TypeError):  # older torch, or mixed devices
        for destination, source in zip(destinations, sources, strict=True):
            destination.copy_(source, non_blocking=True)


class Packer:
    """Packs each update's layout into a sender's fixed buffers, keeping the destination views and
    the manifests' JSON while the layout and the buffers stay the same (every step of a training run):
    rebuilding 300+ views and dicts each time costs milliseconds of Python, more than the copy itself
    on a GPU. The returned dicts are shared between updates: read them, do not change them."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._destinations: list[list[torch.Tensor]] = []
        self._json: list[dict[str, Any]] = []

    def pack(self, buffers: list[torch.Tensor], layout: PackPlan) -> list[dict[str, Any]]:
        """Pack every bucket of ``layout`` into its buffer; returns the manifests' JSON."""
        self.prepare(buffers, layout)
        for index in range(len(layout.buckets)):
            self.pack_bucket(index, layout)
        return self._json

    def prepare(self, buffers: list[torch.Tensor], layout: PackPlan) -> list[dict[str, Any]]:
        """Make (or keep) the destination views of ``layout`` in ``buffers`` (one per bucket)."""
        key = (tuple(b.data_ptr() for b in buffers), tuple(layout.buckets))
        if key != self._key:
            self._destinations = [[view(buffer, e.offset, e.dtype, e.shape) for e in manifest.tensors]
                                  for buffer, manifest in zip(buffers, layout.buckets, strict=True)]
            self._json = [manifest.to_json() for manifest in layout.buckets]
            self._key = key
        return self._json

    def pack_bucket(self, index: int, layout: PackPlan) -> None:
        """Copy bucket ``index``'s tensors into its buffer (after :meth:`prepare`)."""
        copy_all(self._destinations[index], [layout.tensors[e.name] for e in layout.buckets[index].tensors])


def unpack(manifest: BucketManifest, buffer: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for entry in manifest.tensors:
        yield entry.name, view(buffer, entry.offset, entry.dtype, entry.shape)


def iter_weight_chunks(weights: Weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype_for: DtypeFor = None,
                       device: torch.device | str | None = None) -> Iterator[WeightChunk]:
    """Pack ``weights`` bucket by bucket into fresh buffers on ``device`` (default: where the first
    tensor lives). Only the bucket being yielded is allocated by this function, so memory stays
    bounded by ``bucket_bytes`` as long as the caller lets go of each chunk."""
    layout = plan(weights, bucket_bytes, dtype_for)
    for manifest in layout.buckets:
        first = layout.tensors[manifest.tensors[0].name]
        buffer = torch.empty(manifest.nbytes, dtype=torch.uint8, device=device or first.device)
        pack_into(buffer, manifest, layout.tensors)
        yield WeightChunk(manifest, buffer)
