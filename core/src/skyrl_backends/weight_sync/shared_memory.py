"""Colocated weight sync on CPU: packed buckets in POSIX shared-memory segments.

The sender writes each bucket into a segment named ``skyrl_ws_<hex>`` and sends only the segment
names and manifests. The receiver maps every segment (checking its name, its size and the manifest)
before it yields a single tensor, and yields views into the mappings: the engine's own copy into its
parameters is the only copy on the receiving side. The sender keeps its segments alive until the
engine has acknowledged the update, reuses them for the next update of the same layout (so pages are
not faulted in again) and unlinks them on :meth:`SharedMemorySender.close` (and, as a safety net,
Python's resource tracker unlinks them if the trainer dies).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any

import torch

from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync.chunks import (
    DEFAULT_BUCKET_BYTES,
    DtypeFor,
    Packer,
    PackPlan,
    Weights,
    adopt,
    plan,
    unpack,
)
from skyrl_backends.weight_sync.layout_memo import LayoutMemo
from skyrl_backends.weight_sync.manifest import BucketManifest, parse_buckets

STRATEGY = "shared_memory"
SEGMENT_PREFIX = "skyrl_ws_"
# Segment names come from another process: only our own pattern is ever opened, so a request
# cannot make the engine map an arbitrary object (no "/", no "..").
_SEGMENT_NAME = re.compile(r"^skyrl_ws_[0-9a-f]{16,64}$")


class Segment:
    """A segment this process created, with a uint8 tensor over it."""

    def __init__(self, nbytes: int) -> None:
        name = SEGMENT_PREFIX + secrets.token_hex(12)
        # SharedMemory refuses size 0; an empty bucket still gets a (1-byte) segment.
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=max(nbytes, 1))
        self.nbytes = nbytes
        # Over a memoryview of its own, which holds the mapping exported while any view of the tensor
        # lives: closing the segment then fails (BufferError) instead of unmapping memory in use.
        self.tensor = torch.frombuffer(memoryview(self.shm.buf), dtype=torch.uint8, count=nbytes) if nbytes else \
            torch.empty(0, dtype=torch.uint8)

    @property
    def name(self) -> str:
        return self.shm.name.lstrip("/")

    def release(self) -> None:
        self.tensor = None  # drop the export of shm.buf before closing
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass
        try:
            self.shm.close()
        except BufferError:
            # Tensors still view the segment (adopted parameters outlive their sender): the mapping
            # stays until the last of them goes, owned by their memoryview, not by this object, whose
            # own close (again at garbage collection) would fail the same way.
            self.shm._mmap = None


class SharedMemorySender:
    """Writes packed buckets into shared memory and describes them in a request payload.

    Keep one sender for repeated syncs: segments are reused while the bucket layout stays the same.
    The caller must not start the next :meth:`write` before every engine has applied the previous
    update (``sync_weights`` awaits the engines)."""

    strategy = STRATEGY

    def __init__(self) -> None:
        self._segments: list[Segment] = []
        self._packer = Packer()

    def write(self, layout: PackPlan) -> dict[str, Any]:
        buffers = self.allocate(layout)  # first: new segments come with a new packer
        return self._payload(layout, self._packer.pack(buffers, layout))

    @property
    def copied(self) -> int:
        """How many tensors the last :meth:`write` copied (0 for a model that lives in the segments)."""
        return self._packer.copied

    def adopt(self, weights: Weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
              dtype_for: DtypeFor = None) -> dict[str, torch.Tensor]:
        """Move ``weights`` into this sender's segments, where they stay: a module's parameters and
        buffers become views of the segments (``.data``), so training updates them in place and
        every later sync of the same layout copies nothing on the trainer's side. Returns each name's
        view (for a mapping or pairs, train those). As :meth:`CudaIpcSender.adopt
        <skyrl_backends.weight_sync.cuda_ipc.CudaIpcSender.adopt>`; the segments then live as long as
        the adopted tensors, even after :meth:`close` unlinks their names."""
        layout = plan(weights, bucket_bytes, dtype_for)
        return adopt(weights, self.allocate(layout), layout, self._packer)

    def allocate(self, layout: PackPlan) -> list[torch.Tensor]:
        """One segment per bucket of ``layout`` (kept from the last update when the sizes match), as
        uint8 tensors to write the buckets into; :meth:`segment_names` names them."""
        sizes = [b.nbytes for b in layout.buckets]
        if [s.nbytes for s in self._segments] != sizes:
            self.close()
            self._segments = [Segment(n) for n in sizes]
        return [segment.tensor for segment in self._segments]

    @property
    def segment_names(self) -> list[str]:
        return [segment.name for segment in self._segments]

    def payload(self, layout: PackPlan) -> dict[str, Any]:
        """The request payload describing ``layout`` in the allocated segments."""
        return self._payload(layout, self._packer.prepare(self.allocate(layout), layout))

    def _payload(self, layout: PackPlan, buckets: list[dict[str, Any]]) -> dict[str, Any]:
        # The buckets' JSON is the packer's, kept while the layout and the segments stay.
        return layout.payload([{"segment": segment.name, **bucket}
                               for segment, bucket in zip(self._segments, buckets, strict=True)])

    def close(self) -> None:
        self._packer = Packer()  # its views into the segments would keep them mapped
        for segment in self._segments:
            segment.release()
        self._segments = []

    def __enter__(self) -> SharedMemorySender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_segment(name: str) -> tuple[int, Any]:
    """File descriptor of an existing POSIX shared-memory object, without registering it with the
    resource tracker (which would unlink the trainer's segment when this process exits)."""
    try:
        import _posixshmem

        return _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600), None
    except ImportError:  # pragma: no cover - non-POSIX platforms
        shm = shared_memory.SharedMemory(name=name)
        return -1, shm


# Mappings of the segments of the last update, by name, with the inode they map: a sender reuses its
# segments from step to step, and a mapping that is kept is not faulted in again. Each update still
# opens every segment by name and compares the inode, so an unlinked or replaced segment is noticed.
_mapped: dict[str, tuple[int, int, torch.Tensor]] = {}


def _map(name: str, nbytes: int, where: str) -> torch.Tensor:
    if not isinstance(name, str) or not _SEGMENT_NAME.match(name):
        raise WeightUpdateError({f"{where}.segment": f"{name!r} is not a segment name this library creates "
                                                     f"({_SEGMENT_NAME.pattern})"})
    try:
        fd, fallback = _open_segment(name)
    except FileNotFoundError:
        raise WeightUpdateError({f"{where}.segment": (
            f"shared-memory segment {name!r} does not exist (the sender closed it, or sender and engine are "
            f"on different machines)")}) from None
    if fallback is not None:  # pragma: no cover
        buf = fallback.buf
        size = fallback.size
    else:
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            if size < nbytes:
                raise WeightUpdateError({f"{where}.segment": f"segment {name!r} holds {size} bytes but the manifest "
                                                             f"needs {nbytes}; the buffer is truncated"})
            cached = _mapped.get(name)
            if cached is not None and cached[0] == stat.st_ino and cached[1] >= nbytes:
                return cached[2][:nbytes]
            buf = mmap.mmap(fd, max(nbytes, 1)) if nbytes else None
        finally:
            os.close(fd)
        if nbytes:
            tensor = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)
            _mapped[name] = (stat.st_ino, nbytes, tensor)
            return tensor
    if size < nbytes:
        raise WeightUpdateError({f"{where}.segment": f"segment {name!r} holds {size} bytes but the manifest needs "
                                                     f"{nbytes}; the buffer is truncated"})
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    # The tensor keeps the mapping alive; unlinking by the sender does not invalidate it.
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)


def map_segment(name: str, nbytes: int, where: str) -> torch.Tensor:
    """A writable uint8 tensor over the first ``nbytes`` of segment ``name`` created by another process
    of this machine (the sending rank, for the other ranks of a sharded trainer), checked as a
    receiver checks it."""
    return _map(name, nbytes, where)


def forget_mappings_except(names: set[str]) -> None:
    """Let go of the kept mappings of every segment not in ``names``."""
    for name in [n for n in _mapped if n not in names]:
        del _mapped[name]


# The last update's layout and views: a trainer reuses its segments from step to step, and a request
# with the same layout into the same mappings gets the views made last time (each segment is still
# opened by name and checked against its inode and size at every update).
_memo = LayoutMemo()


def forget_layout() -> None:
    """Drop the remembered layout (and its views): the next update is validated from scratch."""
    _memo.forget()


def receive(request: WeightUpdateRequest) -> Iterator[tuple[str, torch.Tensor]]:
    """Map and validate every bucket first, then return an iterator of views into the segments.

    The views are valid while the engine applies the update (the sender keeps the segments until it
    is acknowledged); an engine must copy them into its parameters, never keep them."""
    if _memo.matches(request):
        buckets = request.payload["buckets"]
        buffers = [_map(raw["segment"], raw["nbytes"], f"payload.buckets[{b}]") for b, raw in enumerate(buckets)]
        pairs = _memo.views(buffers)
        if pairs is not None:
            return iter(pairs)
    staged: list[tuple[BucketManifest, torch.Tensor]] = []
    parsed = parse_buckets(request, extra_fields=("segment",))
    for b, (manifest, raw) in enumerate(parsed):
        staged.append((manifest, _map(raw["segment"], manifest.nbytes, f"payload.buckets[{b}]")))
    forget_mappings_except({raw["segment"] for _, raw in parsed})  # segments of older layouts
    pairs = [pair for manifest, buffer in staged for pair in unpack(manifest, buffer)]
    _memo.remember(request, [buffer for _, buffer in staged], pairs)
    return iter(pairs)
