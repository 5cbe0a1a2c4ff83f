"""Trainer side: turn a model into packed byte buckets (``WeightChunk``) ready to send.

A model, a state dict or an iterable of ``(name, tensor)`` becomes a list of named tensors; each is
converted to the dtype the engine holds, and consecutive tensors are packed into one contiguous
``uint8`` buffer per bucket of at most ``bucket_bytes`` (a larger tensor gets its own bucket), so one
IPC handle, one shared-memory segment or one collective moves many tensors at once.
"""

from __future__ import annotations

import bisect
import copy
import functools
import itertools
import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from skyrl_backends.errors import ConfigError, WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.delivery import dtype_name as _dtype_name
from skyrl_backends.weight_sync.manifest import DTYPE_ITEMSIZE, PLAN_FIELD, BucketManifest, plan_json, planned_once
from skyrl_backends.weight_sync.module_tensors import module_columns, module_tensors

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 1 << 30  # 1 GiB
DtypeFor = None | str | torch.dtype | Mapping[str, Any] | Callable[[str, torch.Tensor], Any]
Weights = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    return _dtype_name(dtype)


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_ITEMSIZE:
        raise WeightUpdateError({"dtype": f"{dtype!r} is not allowed; allowed: {sorted(DTYPE_ITEMSIZE)}"})
    return getattr(torch, dtype)


def named_tensors(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a module (its state dict: parameters and persistent buffers, tied
    weights once; :mod:`~skyrl_backends.weight_sync.module_tensors`), a state dict, or an iterable of
    pairs. Tensors are referenced, not copied; those that require grad are detached."""
    if isinstance(weights, torch.nn.Module):
        return module_tensors(weights)
    names, tensors = named_columns(weights)
    return list(zip(names, tensors, strict=True))


def named_columns(weights: Weights) -> tuple[list[str], list[torch.Tensor]]:
    """:func:`named_tensors` as two lists, names and tensors, checked and detached by C-level loops
    (``map``) rather than a Python loop per tensor: a sync runs this over every tensor at every step.
    :func:`plan_named` plans them without checking them again."""
    if isinstance(weights, torch.nn.Module):
        return module_columns(weights)
    if isinstance(weights, Mapping):  # its keys and values are the columns: no pair is built
        names, tensors = list(weights), list(weights.values())
        unpaired = False
    else:
        pairs = list(weights)
        try:
            names, tensors = (list(column) for column in zip(*pairs, strict=True)) if pairs else ([], [])
        except (TypeError, ValueError):
            names = tensors = []  # not all pairs: the check below names the first that is not
        unpaired = len(names) != len(pairs)
    if unpaired or not all(map(isinstance, names, itertools.repeat(str))) or not all(
            map(isinstance, tensors, itertools.repeat(torch.Tensor))):
        _raise_first_unnamed(list(weights.items()) if isinstance(weights, Mapping) else pairs)
    if any(map(_REQUIRES_GRAD, tensors)):
        # A tensor that needs no grad is passed as it is: the same object at every sync of the same
        # weights, which is what lets a sender see that an adopted tensor is still in place cheaply.
        tensors = [tensor.detach() if tensor.requires_grad else tensor for tensor in tensors]
    return names, tensors


_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")


def _raise_first_unnamed(pairs: list[Any]) -> None:
    for pair in pairs:
        name, tensor = pair if isinstance(pair, tuple | list) and len(pair) == 2 else (pair, None)
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError({str(name): f"expected (str, torch.Tensor), got ({type(name).__name__}, "
                                                f"{type(tensor).__name__})"})


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

    sources: list[torch.Tensor]  # the tensors, by the order of ``names``
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    buckets: list[BucketManifest]
    bucket_bytes: int  # what planned ``buckets`` (plan_buckets, default alignment)
    # Where each tensor is, by the order of ``names`` (with ``shapes``): its address, its own dtype and
    # whether it is contiguous. Read once here, column by column, so that a sender sees in a few
    # list comparisons per bucket that an adopted model's tensors are all in place.
    addresses: list[int]
    own_dtypes: list[torch.dtype]
    contiguous: list[bool]

    @functools.cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (built when first asked: an adopted model's sync never needs it)."""
        return dict(zip(self.names, self.sources, strict=True))

    def bucket_sizes(self) -> list[dict[str, Any]]:
        """Each bucket's JSON in a planned payload before the strategy adds its fields: its size."""
        return [{"nbytes": manifest.nbytes} for manifest in self.buckets]

    def request(self, strategy: str, payload: Any, check_finite: bool = False) -> WeightUpdateRequest:
        """The update request of this layout. Requests of one layout share its names, dtypes and
        shapes, checked once (``WeightUpdateRequest`` checks them; 2,361 shapes took 0.5 ms of
        Python at every sync): read them, do not change them."""
        if not isinstance(check_finite, bool):
            raise ConfigError("check_finite", f"must be True or False, got {check_finite!r}.")
        request = copy.copy(_checked_layout(self))
        request.strategy, request.payload, request.check_finite = strategy, payload, check_finite
        return request

    def payload(self, buckets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A request payload of this layout in its planned form (the receiver derives the manifests
        from the plan, see skyrl_backends.weight_sync.manifest): ``buckets`` are :meth:`bucket_sizes`
        with each strategy's fields added (those alone where None)."""
        return {PLAN_FIELD: plan_json(self.bucket_bytes),
                "buckets": self.bucket_sizes() if buckets is None else buckets}


# The checked request of the layout planned last (its buckets, the very objects planned_once hands
# out again for the same layout, and a request without payload), replaced whole.
_last_checked: tuple[list[BucketManifest], WeightUpdateRequest] | None = None


def _checked_layout(layout: PackPlan) -> WeightUpdateRequest:
    global _last_checked
    last = _last_checked
    if last is None or len(last[0]) != len(layout.buckets) or any(
            a is not b for a, b in zip(last[0], layout.buckets, strict=True)):
        last = _last_checked = (list(layout.buckets), WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes))
    return last[1]


def _dtype_names(dtype_for: Mapping[str, Any]) -> Mapping[str, str]:
    """A ``dtype_for`` mapping as dtype names, each value checked as :func:`to_torch_dtype` checks it:
    the distinct values once, not a conversion per name (a MoE model maps thousands of names)."""
    values = set(dtype_for.values())
    for value in values:
        to_torch_dtype(value)
    if all(isinstance(value, str) for value in values):
        return dtype_for
    return {name: value if isinstance(value, str) else _dtype_name(value) for name, value in dtype_for.items()}


def plan(weights: Weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype_for: DtypeFor = None) -> PackPlan:
    return plan_named(*named_columns(weights), bucket_bytes, dtype_for)


def plan_named(names: list[str], tensors: list[torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               dtype_for: DtypeFor = None) -> PackPlan:
    """:func:`plan` of the columns :func:`named_columns` gave (checked and detached there, not again)."""
    # Column by column, each tensor's attributes read once by C-level loops (``map``): a sync plans
    # every tensor at every step (thousands for a MoE model). Shapes stay ``torch.Size``, a tuple.
    own_dtypes = list(map(_DTYPE, tensors))
    shapes: list[Any] = list(map(_SHAPE, tensors))
    addresses = list(map(torch.Tensor.data_ptr, tensors))
    contiguous = list(map(torch.Tensor.is_contiguous, tensors))
    dtype_names = {dtype: _dtype_name(dtype) for dtype in set(own_dtypes)}
    if dtype_for is None:
        dtypes = list(map(dtype_names.__getitem__, own_dtypes))
    elif isinstance(dtype_for, Mapping):  # sync_weights' default: the engine's dtype of each name
        by_name = _dtype_names(dtype_for)
        dtypes = [by_name.get(name) or dtype_names[own] for name, own in zip(names, own_dtypes, strict=True)]
    else:
        target = resolve_dtype_for(dtype_for)
        dtypes = [_dtype_name(target(name, tensor)) for name, tensor in zip(names, tensors, strict=True)]
    return PackPlan(tensors, names, dtypes, shapes, planned_once(names, dtypes, shapes, bucket_bytes), bucket_bytes,
                    addresses, own_dtypes, contiguous)


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


# A tensor of at least this many bytes is copied on its own: a fused multi-tensor copy runs at about
# two thirds of a GPU's copy bandwidth, a plain copy per large tensor near it; a copy each for the
# hundreds of small tensors (norms, biases) would cost more in launches than their bytes, so they
# share one fused copy. On an H200 (core/benchmarks/bench_apply_copy.py, docs/benchmarks.md
# "2026-12-06") this applies a 1.5B model in 0.88x and a 7B in 0.73x the time of one fused copy.
COPY_ALONE_BYTES = 1 << 20


def copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor],
             alone_bytes: int | None = COPY_ALONE_BYTES) -> None:
    """Copy (and convert) every source into its destination, queued on the current stream: tensors of
    at least ``alone_bytes`` bytes one copy each, the others in one fused multi-tensor copy (all of
    them fused where ``alone_bytes`` is None)."""
    CopyPlan(destinations, sources, alone_bytes).run()


class CopyPlan:
    """:func:`copy_all`'s split of the same copies, made once: a replayed load runs the same copies at
    every update, and sizing 340 tensors again each time is Python it need not spend.

    Two ways to queue the same copies on a GPU, both off by default until measured to pay
    (core/benchmarks/bench_apply_copy.py): ``streams`` spreads the copies of large tensors over that
    many CUDA streams (the current one and side streams that start after the work queued before
    and end before the work queued after), so one copy's ramp-down overlaps the next's start;
    ``graph`` captures the copies once into a CUDA graph and replays it at every :meth:`run`, one
    launch instead of one per tensor. A graph reads and writes the addresses it captured: use it
    only while every tensor stays where it is (a replayed load's buffers and parameters do). On a
    CPU both are ignored."""

    def __init__(self, destinations: list[torch.Tensor], sources: list[torch.Tensor],
                 alone_bytes: int | None = COPY_ALONE_BYTES, *, streams: int = 1, graph: bool = False) -> None:
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self.alone: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fused_destinations: list[torch.Tensor] = []
        self.fused_sources: list[torch.Tensor] = []
        for destination, source in zip(destinations, sources, strict=True):
            if alone_bytes is not None and destination.numel() * destination.element_size() >= alone_bytes:
                self.alone.append((destination, source))
            else:
                self.fused_destinations.append(destination)
                self.fused_sources.append(source)
        on_gpu = bool(destinations) and destinations[0].is_cuda
        self.device = destinations[0].device if on_gpu else None
        self.lanes = _lanes(self.alone, streams if on_gpu else 1)
        self._side_streams: list[torch.cuda.Stream] = []
        self.graph = graph and on_gpu
        self._graph: torch.cuda.CUDAGraph | None = None

    def run(self) -> None:
        if self.graph and self._graph is None:
            self._capture()
        if self._graph is None:
            self._queue()
        else:
            self._graph.replay()

    def _capture(self) -> None:
        # A capture only records (nothing runs), so a capture that fails leaves every copy to do: the
        # plan then queues them from Python, now and from then on, rather than failing the update.
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._queue()
        except RuntimeError as exc:
            logger.warning("skyrl: %d weight copies could not be captured in a CUDA graph (%s); they are queued "
                           "from Python instead", len(self.alone) + len(self.fused_destinations), exc)
            self.graph = False
            return
        self._graph = graph

    def _queue(self) -> None:
        if len(self.lanes) > 1:
            self._queue_on_streams()
        else:
            for destination, source in self.alone:
                destination.copy_(source, non_blocking=True)
        if not self.fused_destinations:
            return
        try:
            torch._foreach_copy_(self.fused_destinations, self.fused_sources, non_blocking=True)
        except (AttributeError, RuntimeError, TypeError):  # older torch, or mixed devices
            for destination, source in zip(self.fused_destinations, self.fused_sources, strict=True):
                destination.copy_(source, non_blocking=True)

    def _queue_on_streams(self) -> None:
        # The first lane runs on the current stream; each other lane on a side stream that waits for
        # what the current stream queued before and that the current stream waits for in turn, so
        # the copies are ordered like any other work of the current stream. Nothing is allocated
        # here, so the caching allocator needs no record_stream.
        current = torch.cuda.current_stream(self.device)
        if len(self._side_streams) != len(self.lanes) - 1:
            self._side_streams = [torch.cuda.Stream(self.device) for _ in self.lanes[1:]]
        ready = current.record_event()
        done = []
        for side, lane in zip(self._side_streams, self.lanes[1:], strict=True):
            side.wait_event(ready)
            with torch.cuda.stream(side):
                for destination, source in lane:
                    destination.copy_(source, non_blocking=True)
            done.append(side.record_event())
        for destination, source in self.lanes[0]:
            destination.copy_(source, non_blocking=True)
        for event in done:
            current.wait_event(event)


def _lanes(pairs: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``pairs`` dealt into at most ``count`` lanes of about equal bytes (largest first, each to the
    lightest lane), each lane in the pairs' own order."""
    count = max(1, min(count, len(pairs)))
    if count == 1:
        return [list(pairs)]
    load = [0] * count
    lane_of = {}
    for index in sorted(range(len(pairs)), key=lambda i: -pairs[i][0].numel() * pairs[i][0].element_size()):
        lane = load.index(min(load))
        lane_of[index] = lane
        load[lane] += pairs[index][0].numel() * pairs[index][0].element_size()
    return [[pair for i, pair in enumerate(pairs) if lane_of[i] == lane] for lane in range(count)]


class Packer:
    """Packs each update's layout into a sender's fixed buffers, keeping the destination views and
    the buckets' JSON while the layout and the buffers stay the same (every step of a training run):
    rebuilding 300+ views and dicts each time costs milliseconds of Python, more than the copy itself
    on a GPU. The returned dicts are shared between updates: read them, do not change them.

    A tensor that already lives at its place in the buffers (a trainer whose parameters were adopted
    by the sender, :func:`adopt`) is not copied: packing such a model costs a comparison of each
    bucket's columns of :class:`PackPlan` (addresses, own dtypes, shapes) with its destinations'.
    ``copied`` counts the tensors the last :meth:`pack` did copy."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._destinations: list[list[torch.Tensor]] = []
        # Each bucket's destinations as PackPlan's columns: addresses, dtypes, shapes.
        self._wanted: list[tuple[list[int], list[torch.dtype], list[torch.Size]]] = []
        self._ranges: list[tuple[int, int]] = []  # each bucket's tensors in the layout's order
        self._json: list[dict[str, Any]] = []
        self.copied = 0

    def pack(self, buffers: list[torch.Tensor], layout: PackPlan) -> list[dict[str, Any]]:
        """Pack every bucket of ``layout`` into its buffer; returns the buckets' JSON (as :meth:`prepare`).
        Refused before anything is copied if a tensor to copy lives in ``buffers`` (see
        :func:`_refuse_sources_in`)."""
        self.prepare(buffers, layout)
        copies = [self._copies(index, layout) for index in range(len(layout.buckets))]
        if any(positions for _, _, positions in copies):
            _refuse_sources_in(buffers, layout, [at for _, _, positions in copies for at in positions])
        self.copied = 0
        for destinations, sources, _ in copies:
            self._copy(destinations, sources)
        return self._json

    def prepare(self, buffers: list[torch.Tensor], layout: PackPlan) -> list[dict[str, Any]]:
        """Make (or keep) the destination views of ``layout`` in ``buffers`` (one per bucket). Returns
        each bucket's JSON for a planned payload (:meth:`PackPlan.payload`): its size, no manifest."""
        key = (tuple(b.data_ptr() for b in buffers), tuple(layout.buckets))
        if key != self._key:
            self._destinations = [[view(buffer, e.offset, e.dtype, e.shape) for e in manifest.tensors]
                                  for buffer, manifest in zip(buffers, layout.buckets, strict=True)]
            self._wanted = [([d.data_ptr() for d in destinations], [d.dtype for d in destinations],
                             [d.shape for d in destinations]) for destinations in self._destinations]
            # Buckets hold consecutive tensors of the layout's order: bucket i is names[start:end].
            starts = list(itertools.accumulate((len(m.tensors) for m in layout.buckets), initial=0))
            self._ranges = list(itertools.pairwise(starts))
            self._json = layout.bucket_sizes()
            self._key = key
        return self._json

    def destinations(self, index: int) -> list[torch.Tensor]:
        """The views of bucket ``index``'s tensors in its buffer (after :meth:`prepare`)."""
        return self._destinations[index]

    def pack_bucket(self, index: int, layout: PackPlan) -> None:
        """Copy bucket ``index``'s tensors into its buffer (after :meth:`prepare`), but for those
        already in place."""
        destinations, sources, _ = self._copies(index, layout)
        self._copy(destinations, sources)

    def _copies(self, index: int, layout: PackPlan) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """The copies bucket ``index`` needs: destinations, sources and the sources' positions in the
        layout (none if every tensor is in place)."""
        start, end = self._ranges[index]
        addresses, dtypes, shapes = self._wanted[index]
        # Column by column (C-level list comparisons, no tuple per tensor): every tensor lives at its
        # place already (adopted) when its address, dtype and shape are its destination's and it is
        # contiguous.
        if (layout.addresses[start:end] == addresses and layout.own_dtypes[start:end] == dtypes
                and layout.shapes[start:end] == shapes and all(layout.contiguous[start:end])):
            return [], [], []
        destinations, sources, positions = [], [], []
        for i, destination in enumerate(self._destinations[index]):
            at = start + i
            if not (layout.addresses[at] == addresses[i] and layout.own_dtypes[at] == dtypes[i]
                    and layout.shapes[at] == shapes[i] and layout.contiguous[at]):  # not the very bytes
                destinations.append(destination)
                sources.append(layout.sources[at])
                positions.append(at)
        return destinations, sources, positions

    def _copy(self, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        if destinations:
            copy_all(destinations, sources)
        self.copied += len(destinations)


def _refuse_sources_in(buffers: list[torch.Tensor], layout: PackPlan, positions: list[int]) -> None:
    """Refuse copies that read a sender's own buffers (the tensors at ``positions`` of ``layout``,
    which are not at their places). A tensor there (an adopted tensor transposed in place, or
    adopted tensors synced in another order of the same bucket sizes) shares its bytes with the
    trainer's adopted tensors: writing it into the buffers would change those tensors, and could
    read bytes another copy has just written."""
    # By address: a tensor that starts inside a buffer is a view of it (live allocations are apart).
    # A packing sender copies every tensor at every sync, so the common case (none inside) is one
    # comparison per tensor against the buffers' overall range, and a search among them after that.
    spans = sorted((buffer.data_ptr(), buffer.data_ptr() + buffer.numel()) for buffer in buffers if buffer.numel())
    if not spans:
        return
    starts = [start for start, _ in spans]
    low, high = starts[0], max(end for _, end in spans)
    inside = [at for at in positions if low <= layout.addresses[at] < high
              and layout.addresses[at] < spans[bisect.bisect_right(starts, layout.addresses[at]) - 1][1]]
    if inside:
        raise WeightUpdateError({layout.names[at]: (
            "is a view of this sender's send buffers, but not its own place in this layout (its address, dtype, "
            "shape or strides differ: transposed or reshaped in place, or synced in another order than adopted); "
            "copying it would overwrite the trainer's adopted tensors. Sync the tensors adopt returned as they "
            "are, or adopt the weights again into a new sender") for at in inside})


def adopt(weights: Weights, buffers: list[torch.Tensor], layout: PackPlan, packer: Packer) -> dict[str, torch.Tensor]:
    """Copy ``weights`` into ``buffers`` (a sender's send buckets, allocated for ``layout``) and make
    the buckets their storage from now on: a module's parameters and buffers are re-pointed there
    (``.data``), so the trainer keeps training them in place and a sync packs nothing. Returns each
    name's view in the buckets (for weights given as a mapping or pairs, use these from now on: a
    tensor that is not in place is simply copied, as before).

    Every tensor must already have the dtype it is sent in (no conversion can live in place)."""
    problems = {name: f"is {_dtype_name(layout.tensors[name].dtype)} but is sent as {dtype}; adopt sends "
                      f"tensors in their own dtype (convert the model first, or do not adopt it)"
                for name, dtype in zip(layout.names, layout.dtypes, strict=True)
                if _dtype_name(layout.tensors[name].dtype) != dtype}
    if problems:
        raise WeightUpdateError(problems)
    packer.pack(buffers, layout)
    views = {entry.name: destination for index, manifest in enumerate(layout.buckets)
             for entry, destination in zip(manifest.tensors, packer.destinations(index), strict=True)}
    if isinstance(weights, torch.nn.Module):
        with torch.no_grad():
            for name, tensor in _module_tensors(weights):
                if name in views:
                    tensor.data = views[name]
    return views


def _module_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's parameters and buffers by state-dict name, tied ones under each of their names."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


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
